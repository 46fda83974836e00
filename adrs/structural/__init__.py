"""The LLM-free structural mutator: maskers as typed compositions of primitives (genome, render, mutate)."""
from adrs.structural.mutate import StructuralMutator

__all__ = ["StructuralMutator"]
