"""Hostile: writes a forged "all done" status into its own result pipe after one selection; expect crash.

The parent reads the stream as data: a status claiming success before every selection arrived
is a wrong count, never a score.
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
import json
import os
import stat
import struct


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
        head = json.dumps({"status": {"ok": True, "records": 8}}).encode()
        os.write(_result_pipe(), struct.pack("<QQ", len(head), 0) + head)
    return _valid(inp)
# EVOLVE-BLOCK-END
