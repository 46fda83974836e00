"""Reference: oracle top-k. Attends to the keys with the largest true scores.

Needs every score q.k, so it saves no work; it is the accuracy bound for deterministic
selection at a given density.
"""
import torch

from evaluator.contract import MaskerInput, Selection, attention_logits, budget, top_per_query

# EVOLVE-BLOCK-START


def masker(inp: MaskerInput) -> Selection:
    """Top ``density_target`` fraction of causal keys by exact logit, weight 1."""
    logits = attention_logits(inp)
    return top_per_query(logits, budget(inp)).float()
# EVOLVE-BLOCK-END
