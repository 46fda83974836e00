"""Hostile: returns a gigantic padded sparse selection; expect output."""
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
from evaluator.contract import SparseSelection


def masker(inp: MaskerInput):
    b, h, q = inp.queries.shape[:3]
    idx = torch.full((b, h, q, 400_000), -1, dtype=torch.int64, device=inp.keys.device)
    idx[..., 0] = 0
    return SparseSelection(idx, torch.ones(idx.shape, device=idx.device))
# EVOLVE-BLOCK-END
