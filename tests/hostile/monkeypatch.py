"""Hostile: patches torch and the contract/scoring modules so NaN weights pass; expect invalid."""
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
import evaluator.contract as contract
import evaluator.scoring as scoring

torch.isfinite = lambda x: torch.ones_like(x, dtype=torch.bool)
scoring.dense_weights = lambda selection, record: selection
scoring.score_record = lambda record, selection: (0.0, 0.0)
contract.num_causal = lambda inp: torch.ones(inp.query_positions.shape[0], dtype=torch.long, device=inp.keys.device)


def masker(inp: MaskerInput):
    sel = _valid(inp)
    sel[..., 0] = float("nan")
    return sel
# EVOLVE-BLOCK-END
