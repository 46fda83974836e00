"""Hostile: trickles a never-ending message into its own result pipe, a byte at a time; expect timeout.

The parent reads as bytes arrive; the wall-time limit must hold while they do.
"""
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
import fcntl
import os
import stat
import struct
import time


def _result_pipe() -> int:
    for fd in range(3, 256):
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode) and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY:
                return fd
        except OSError:
            continue
    raise RuntimeError("no result pipe found")


def masker(inp: MaskerInput):
    if inp.layer_idx == 3:
        fd = _result_pipe()
        os.write(fd, struct.pack("<QQ", 1 << 19, 0))  # a 512 KiB header is announced...
        while True:
            os.write(fd, b" ")  # ...and never finished
            time.sleep(0.01)  # always sooner than the parent's 50 ms poll
    return _valid(inp)
# EVOLVE-BLOCK-END
