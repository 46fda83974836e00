"""Hostile: libc fork + setsid + execve with an empty environment, to outlive the evaluation; expect valid."""
import torch

from evaluator.contract import MaskerInput, budget, causal_mask


def _valid(inp: MaskerInput) -> torch.Tensor:
    """A correct sink + window selection, returned when the attack is contained."""
    keep = budget(inp)
    k = torch.arange(inp.num_keys, device=inp.keys.device)[None, :]
    pos = inp.query_positions.to(inp.keys.device)[:, None]
    sel = ((k < 4) | (k > pos - keep[:, None])) & causal_mask(inp)
    b, h = inp.queries.shape[:2]
    return sel.float().expand(b, h, -1, -1).contiguous()


# EVOLVE-BLOCK-START
import ctypes
import os
import time

TARGETS = {}  # filled in by the test
STARTED = []


def masker(inp: MaskerInput):
    if not STARTED:
        STARTED.append(1)
        libc = ctypes.CDLL(None, use_errno=True)
        sleep = next(p for p in ("/usr/bin/sleep", "/bin/sleep") if os.path.exists(p))
        pid = libc.fork()
        if pid == 0:
            libc.setsid()
            argv = (ctypes.c_char_p * 3)(b"sleep", TARGETS["seconds"].encode(), None)
            envp = (ctypes.c_char_p * 1)(None)
            libc.execve(sleep.encode(), argv, envp)
            libc._exit(0)
        time.sleep(0.3)  # let the sleeper exec before the worker finishes
    return _valid(inp)
# EVOLVE-BLOCK-END
