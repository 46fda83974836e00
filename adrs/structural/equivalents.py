"""Genomes equivalent to maskers written by hand (the seeds), so a search can start from them.

A parent without a genome comment is recognised by the names of its top-level constants and
the primitives it calls; the numbers come from its constants. What is not recognised has no
genome, and the structural mutator falls back to tuning its constants.
"""
from __future__ import annotations

import ast

from adrs.structural.genome import Genome, Sample, Scorer, Sink, TopK, Window, normalize
from adrs.structural.render import read_genome, top_level_numbers
from evaluator.candidate import parse_source


def _calls(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            names.add(f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else "")
    return names


def equivalent_genome(block: str, density_target: float) -> Genome | None:
    """A genome for a seed-like block (sink_window, oracle_topk, hybrid_sampling, vattention, quest_pages)."""
    try:
        tree = parse_source(block)
    except SyntaxError:
        return None
    consts, calls = top_level_numbers(tree), _calls(tree)
    names = set(consts)
    if names == {"SINK_TOKENS"} and "attention_logits" not in calls and "rand" not in calls:
        return normalize(Genome((Sink(int(consts["SINK_TOKENS"])), Window(1.0))))
    if not names and "attention_logits" in calls and "rand" not in calls:
        return normalize(Genome((TopK(1.0),)))
    if {"SINK_TOKENS", "WINDOW_FRACTION", "TOPK_FRACTION"} <= names and "rand" in calls:
        # Hand-written fractions are of the causal tokens; genome shares are of the budget.
        window = consts["WINDOW_FRACTION"] / density_target
        topk = consts["TOPK_FRACTION"] / density_target
        rest = max(1.0 - window - topk, 0.05)
        return normalize(Genome((Sink(int(consts["SINK_TOKENS"])), Window(window), TopK(topk), Sample(rest))))
    if names == {"PAGE_SIZE"}:
        return normalize(Genome((Sink(1), TopK(1.0)), Scorer(kind="pages", page=int(consts["PAGE_SIZE"]))))
    return None


def genome_of(block: str, density_target: float) -> tuple[Genome | None, str]:
    """The block's genome and where it came from (``rendered``, ``equivalent`` or ``none``)."""
    genome = read_genome(block)
    if genome is not None:
        return genome, "rendered"
    genome = equivalent_genome(block, density_target)
    return (genome, "equivalent") if genome is not None else (None, "none")
