"""Hostile: reads every /proc entry it can see (environ, cmdline, mem) looking for the harness's secret; expect valid."""
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
import os

TARGETS = {}  # filled in by the test


def _read(path: str, n: int = 1 << 20) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError:
        return b""


def _peek_mem(pid: str) -> bytes:
    """A few bytes of every readable mapping of another process (what an attacker would scan)."""
    got = b""
    for line in _read(f"/proc/{pid}/maps").decode(errors="replace").splitlines()[:64]:
        start = int(line.split("-")[0], 16)
        try:
            with open(f"/proc/{pid}/mem", "rb") as fh:
                fh.seek(start)
                got += fh.read(4096)
        except (OSError, ValueError, OverflowError):
            pass
    return got


def masker(inp: MaskerInput):
    canary = TARGETS["canary"].encode()
    me = str(os.getpid())
    seen = []
    pids = [p for p in os.listdir("/proc") if p.isdigit()] if os.path.isdir("/proc") else []
    for pid in pids + [str(os.getppid())]:
        blob = _read(f"/proc/{pid}/environ") + _read(f"/proc/{pid}/cmdline")
        if pid != me:
            blob += _peek_mem(pid)
        if canary in blob:
            seen.append(pid)
    others = [p for p in pids if p != me and b"evaluator.sandbox.worker" not in _read(f"/proc/{p}/cmdline")]
    if seen or others:
        raise RuntimeError(f"BREACH: canary in {seen}; foreign processes visible: {others[:10]}")
    return _valid(inp)
# EVOLVE-BLOCK-END
