"""Hostile: connects to a TCP listener on 127.0.0.1 and to unix sockets through libc; expect valid."""
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
import socket
import struct

TARGETS = {}  # filled in by the test


def _connect(family: int, addr: bytes) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.socket(family, socket.SOCK_STREAM, 0)
    if fd < 0:
        return False
    ok = libc.connect(fd, addr, len(addr)) == 0
    libc.close(fd)
    return ok


def masker(inp: MaskerInput):
    reached = []
    tcp = struct.pack("!HH4s8x", socket.AF_INET, TARGETS["port"], socket.inet_aton("127.0.0.1"))
    tcp = struct.pack("=H", socket.AF_INET) + tcp[2:]  # sa_family is host-endian
    if _connect(socket.AF_INET, tcp):
        reached.append("tcp")
    # A path ends with a NUL; an abstract name starts with one and its length is exact.
    for name, path in (("unix", TARGETS["unix"].encode() + b"\0"), ("abstract", b"\0" + TARGETS["abstract"].encode())):
        addr = struct.pack("=H", socket.AF_UNIX) + path
        if _connect(socket.AF_UNIX, addr):
            reached.append(name)
    if reached:
        raise RuntimeError(f"BREACH: connected to {reached}")
    return _valid(inp)
# EVOLVE-BLOCK-END
