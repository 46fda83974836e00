"""Hostile: reaches for kernel attack surface (nested user namespace, ptrace, io_uring, keyrings); expect valid."""
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
import platform

TARGETS = {}  # filled in by the test


def masker(inp: MaskerInput):
    if platform.machine() != "x86_64":
        return _valid(inp)
    libc = ctypes.CDLL(None, use_errno=True)
    params = ctypes.create_string_buffer(256)
    got = {
        "unshare(CLONE_NEWUSER)": libc.unshare(0x10000000),
        "ptrace(TRACEME)": libc.syscall(101, 0, 0, 0, 0),
        "io_uring_setup": libc.syscall(425, 1, params),
        "keyctl(join session keyring)": libc.syscall(250, 1, None),
    }
    through = [name for name, rc in got.items() if rc >= 0]
    if through:
        raise RuntimeError(f"BREACH: the kernel allowed {through}")
    return _valid(inp)
# EVOLVE-BLOCK-END
