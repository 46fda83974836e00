"""Test candidate: selects nothing (a loophole that must be invalid, never a score)."""
import torch

from evaluator.contract import MaskerInput

# EVOLVE-BLOCK-START


def masker(inp: MaskerInput):
    b, h, q, _ = inp.queries.shape
    return torch.zeros(b, h, q, inp.num_keys)
# EVOLVE-BLOCK-END
