"""Seed: attention sinks plus a sliding window of recent tokens, at the density target.

The starting point of the reference problem. Keeps the first SINK tokens (attention
sinks) and the most recent tokens, sized so each query attends to about
``density_target`` of its causal keys.
"""
import torch

from evaluator.contract import MaskerInput, Selection, budget, causal_mask

# EVOLVE-BLOCK-START
SINK_TOKENS = 4


def masker(inp: MaskerInput) -> Selection:
    """Sinks + local window: weight 1 on the first SINK_TOKENS and the latest tokens."""
    keep = budget(inp)  # [q] tokens per query
    sink = torch.clamp(keep, max=SINK_TOKENS)
    window = keep - sink
    k = torch.arange(inp.num_keys, device=inp.keys.device)[None, :]
    pos = inp.query_positions.to(inp.keys.device)[:, None]
    selected = (k < sink[:, None]) | (k > pos - window[:, None])
    selected = selected & causal_mask(inp)
    b, h = inp.queries.shape[:2]
    return selected.float().expand(b, h, -1, -1)
# EVOLVE-BLOCK-END
