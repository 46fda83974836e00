"""Hostile: looks for what its start-up left behind (a fork server's socket or other workers'
pipes, host paths on sys.path, the launcher's modules, a secret in its environment); expect valid."""
import torch

from evaluator.contract import MaskerInput, budget, causal_mask


def _valid(inp: MaskerInput) -> torch.Tensor:
    """A correct sink + window selection, returned when nothing was left behind."""
    keep = budget(inp)
    k = torch.arange(inp.num_keys, device=inp.keys.device)[None, :]
    pos = inp.query_positions.to(inp.keys.device)[:, None]
    sel = ((k < 4) | (k > pos - keep[:, None])) & causal_mask(inp)
    b, h = inp.queries.shape[:2]
    return sel.float().expand(b, h, -1, -1).contiguous()


# EVOLVE-BLOCK-START
import os
import sys

import evaluator

TARGETS = {}  # filled in by the test


def masker(inp: MaskerInput):
    found = []
    links = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            links[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass  # the fd listing's own descriptor, closed by now
    sockets = {fd: t for fd, t in links.items() if t.startswith("socket:")}
    pipes = {t for t in links.values() if t.startswith("pipe:")}
    if sockets:
        found.append(f"sockets open: {sockets}")
    if len(pipes) > 3:  # the log, the result pipe and the lifeline's read end: nothing of another worker
        found.append(f"{len(pipes)} pipes open: {sorted(links.items())}")
    if not evaluator.__file__.startswith("/sandbox/lib/"):
        found.append(f"evaluator imported from {evaluator.__file__}")
    leftovers = [m for m in ("launcher", "seccomp_filter", "forkserver") if m in sys.modules]
    if leftovers:
        found.append(f"launcher modules importable: {leftovers}")
    environ = repr(dict(os.environ)).encode()
    try:
        with open("/proc/self/environ", "rb") as fh:  # unreadable once root dropped to nobody
            environ += fh.read()
    except OSError:
        pass
    if TARGETS["canary"].encode() in environ or b"OPENAI_API_KEY" in environ:
        found.append("a secret in the environment")
    if found:
        raise RuntimeError("BREACH: " + "; ".join(found))
    return _valid(inp)
# EVOLVE-BLOCK-END
