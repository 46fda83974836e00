"""Test candidate: every causal token with weight 1 (dense attention)."""
from evaluator.contract import MaskerInput, causal_mask

# EVOLVE-BLOCK-START


def masker(inp: MaskerInput):
    b, h = inp.queries.shape[:2]
    return causal_mask(inp).float().expand(b, h, -1, -1).contiguous()
# EVOLVE-BLOCK-END
