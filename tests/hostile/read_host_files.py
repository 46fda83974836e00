"""Hostile: reads the workload cache, the run directory, the home and another user's file; expect valid."""
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


def masker(inp: MaskerInput):
    leaked = []
    for path in TARGETS["read"]:
        try:
            with open(path, "rb") as fh:
                fh.read(16)
            leaked.append(path)
        except OSError:
            pass
        try:
            os.listdir(os.path.dirname(path))
            leaked.append(os.path.dirname(path) + "/")
        except OSError:
            pass
    if leaked:
        raise RuntimeError(f"BREACH: read {leaked}")
    return _valid(inp)
# EVOLVE-BLOCK-END
