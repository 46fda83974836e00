"""Hostile: writes outside scratch by routes an audit hook misses (dir_fd, rename, link, libc); expect valid."""
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

TARGETS = {}  # filled in by the test


def _attempts(target: str) -> None:
    folder, name = os.path.split(target)
    try:  # os.open relative to a directory fd
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        fd = os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=dfd)
        os.write(fd, b"pwned")
        os.close(fd)
    except OSError:
        pass
    try:  # rename a scratch file into place
        with open("staged", "wb") as fh:
            fh.write(b"pwned")
        os.rename("staged", target)
    except OSError:
        pass
    try:  # hard link
        os.link("staged", target)
    except OSError:
        pass
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.open(target.encode(), os.O_WRONLY | os.O_CREAT, 0o644)  # libc, below any audit hook
    if fd >= 0:
        libc.write(fd, b"pwned", 5)
        libc.close(fd)


def masker(inp: MaskerInput):
    for target in TARGETS["write"]:
        _attempts(target)
    for path in TARGETS.get("tamper", []):  # files that exist: try to overwrite them in place
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.open(path.encode(), os.O_WRONLY)
        if fd >= 0:
            libc.write(fd, b"pwned", 5)
            libc.close(fd)
    done = [t for t in TARGETS["write"] if os.path.exists(t)]
    if done:
        raise RuntimeError(f"BREACH: wrote {done}")
    return _valid(inp)
# EVOLVE-BLOCK-END
