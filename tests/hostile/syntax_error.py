"""Hostile: not valid Python; expect syntax."""
import torch

# EVOLVE-BLOCK-START
def masker(inp)
    return inp.queries
# EVOLVE-BLOCK-END
