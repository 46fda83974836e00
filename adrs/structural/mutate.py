"""Structural mutation and crossover of genomes, and the mutator the loop calls.

Mutations change structure (add, remove or swap a component, swap the scorer, switch the
head allocation, re-split the budget) and constants. Crossover takes each component kind,
the scorer and the allocation from one of two parents. Everything is a function of
``(seed, key)``, so a run replays exactly and a resumed run continues where it stopped.
"""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Callable

from adrs.llm.budget import Usage
from adrs.llm.proposal import Proposal
from adrs.mutation import MutationResult, apply_rewrite
from adrs.offline import OfflineMutator
from adrs.structural.equivalents import genome_of
from adrs.structural.genome import (
    BY_KIND, KINDS, SCORER_KINDS, SHARE_KINDS, Allocation, Genome, GenomeError, Sink, Threshold, describe, normalize,
)
from adrs.structural.render import render_block
from evaluator.candidate import CandidateFormatError, split_candidate

Operator = Callable[[Genome, random.Random, float], tuple[Genome, str]]


def _new_component(kind: str, rng: random.Random):
    if kind == "sink":
        return Sink(tokens=rng.choice((1, 2, 4, 8, 16)))
    if kind == "threshold":
        return Threshold(share=rng.uniform(0.1, 0.6), margin=rng.uniform(1.0, 8.0))
    return BY_KIND[kind](share=rng.uniform(0.1, 0.6))


def _scale_others(comps: list, keep_share: float) -> list:
    """Shrink the existing shares so that a new component with ``keep_share`` fits."""
    return [dataclasses.replace(c, share=c.share * (1.0 - keep_share)) if c.kind in SHARE_KINDS else c for c in comps]


def add_component(g: Genome, rng: random.Random, scale: float) -> tuple[Genome, str]:
    missing = [k for k in KINDS if k not in g.kinds]
    if not missing:
        return resplit(g, rng, scale)
    new = _new_component(rng.choice(missing), rng)
    comps = list(g.components)
    if new.kind in SHARE_KINDS:
        comps = _scale_others(comps, new.share)
    return normalize(Genome(tuple(comps) + (new,), g.scorer, g.allocation)), f"add {new.kind}"


def remove_component(g: Genome, rng: random.Random, scale: float) -> tuple[Genome, str]:
    if len(g.components) < 2:
        return add_component(g, rng, scale)
    gone = rng.choice(g.components)
    rest = tuple(c for c in g.components if c is not gone)
    return normalize(Genome(rest, g.scorer, g.allocation)), f"remove {gone.kind}"


def swap_component(g: Genome, rng: random.Random, scale: float) -> tuple[Genome, str]:
    missing = [k for k in KINDS if k not in g.kinds and k != "sink"]
    swappable = [c for c in g.components if c.kind in SHARE_KINDS]
    if not missing or not swappable:
        return add_component(g, rng, scale)
    old, kind = rng.choice(swappable), rng.choice(missing)
    new = dataclasses.replace(_new_component(kind, rng), share=old.share)
    comps = tuple(new if c is old else c for c in g.components)
    return normalize(Genome(comps, g.scorer, g.allocation)), f"swap {old.kind} -> {kind}"


def swap_scorer(g: Genome, rng: random.Random, scale: float) -> tuple[Genome, str]:
    if not g.uses_scores:
        return add_component(g, rng, scale)
    kind = rng.choice([k for k in SCORER_KINDS if k != g.scorer.kind])
    return normalize(Genome(g.components, dataclasses.replace(g.scorer, kind=kind), g.allocation)), f"scorer -> {kind}"


def switch_allocation(g: Genome, rng: random.Random, scale: float) -> tuple[Genome, str]:
    if not g.uses_scores:
        return add_component(g, rng, scale)
    heads = "uniform" if g.allocation.heads == "entropy" else "entropy"
    return normalize(Genome(g.components, g.scorer, Allocation(heads, g.allocation.power))), f"head budget -> {heads}"


def resplit(g: Genome, rng: random.Random, scale: float) -> tuple[Genome, str]:
    """Re-split the budget: multiplicative noise on every share (the last one absorbs the rest)."""
    shares = [c for c in g.components if c.kind in SHARE_KINDS]
    if len(shares) < 2:
        return tune(g, rng, scale)
    comps = tuple(dataclasses.replace(c, share=c.share * math.exp(rng.gauss(0.0, 0.5 * scale)))
                  if c.kind in SHARE_KINDS else c for c in g.components)
    new = normalize(Genome(comps, g.scorer, g.allocation))
    return new, "re-split " + ", ".join(f"{c.kind} {c.share:g}" for c in new.components if c.kind in SHARE_KINDS)


def _jitter_int(value: int, rng: random.Random, scale: float) -> int:
    new = round(value * math.exp(rng.gauss(0.0, 0.5 * scale)))
    return new if new != value else value + rng.choice((-1, 1))


def tune(g: Genome, rng: random.Random, scale: float) -> tuple[Genome, str]:
    """Perturb one constant: sink size, threshold margin, sketch size or entropy power."""
    options = []
    sink = g.get("sink")
    if sink is not None:
        options.append(("sink tokens", lambda: Genome(tuple(
            dataclasses.replace(c, tokens=_jitter_int(c.tokens, rng, scale)) if c is sink else c
            for c in g.components), g.scorer, g.allocation)))
    thr = g.get("threshold")
    if thr is not None:
        options.append(("threshold margin", lambda: Genome(tuple(
            dataclasses.replace(c, margin=c.margin * math.exp(rng.gauss(0, 0.4 * scale))) if c is thr else c
            for c in g.components), g.scorer, g.allocation)))
    field = {"lowrank": "rank", "lowprec": "bits", "pages": "page"}.get(g.scorer.kind)
    if g.uses_scores and field:
        options.append((f"scorer {field}", lambda: Genome(g.components, dataclasses.replace(
            g.scorer, **{field: _jitter_int(getattr(g.scorer, field), rng, scale)}), g.allocation)))
    if g.uses_scores and g.allocation.heads == "entropy":
        options.append(("entropy power", lambda: Genome(g.components, g.scorer, Allocation(
            "entropy", g.allocation.power * math.exp(rng.gauss(0, 0.4 * scale))))))
    if not options:
        return add_component(g, rng, scale)
    what, make = rng.choice(options)
    new = normalize(make())
    return new, f"tune {what}"


# Weights of the operators: budget re-splits and additions do most of the work.
OPERATORS: tuple[tuple[Operator, float], ...] = (
    (add_component, 3.0), (remove_component, 1.5), (swap_component, 1.5), (swap_scorer, 1.0),
    (switch_allocation, 0.7), (resplit, 3.0), (tune, 1.5),
)


def mutate(g: Genome, rng: random.Random, scale: float = 1.0) -> tuple[Genome, list[str]]:
    """Apply one operator (more with a wider ``scale``) until the genome changes."""
    changes: list[str] = []
    new = g
    n_ops = 1 + sum(rng.random() < 0.25 * scale for _ in range(2))
    for _ in range(12):
        new, changes = g, []  # an attempt that changed nothing is not reported
        for _ in range(n_ops):
            op = rng.choices([o for o, _ in OPERATORS], weights=[w for _, w in OPERATORS])[0]
            new, what = op(new, rng, scale)
            changes.append(what)
        if new != g:
            break
    return new, changes


def crossover(a: Genome, b: Genome, rng: random.Random) -> Genome:
    """Each component kind, the scorer and the allocation from one parent or the other."""
    comps = []
    for kind in KINDS:
        ca, cb = a.get(kind), b.get(kind)
        if ca is not None and cb is not None:
            comps.append(rng.choice((ca, cb)))
        elif (ca or cb) is not None and rng.random() < 0.5:
            comps.append(ca or cb)
    if not comps:
        comps = list(a.components)
    return normalize(Genome(tuple(comps), rng.choice((a.scorer, b.scorer)), rng.choice((a.allocation, b.allocation))))


@dataclass(frozen=True)
class StructuralMutator:
    """Deterministic LLM-free mutator over genomes, with the same result shape as an LLM proposal."""

    seed: int = 0
    density_target: float = 0.10
    crossover_rate: float = 0.25

    def propose(self, parent_code: str, partner_code: str | None = None, key: int | str = 0,
                step_scale: float = 1.0) -> MutationResult:
        """A structural child of ``parent_code``; sometimes a crossover with ``partner_code``.

        A parent with no genome (hand-written code that is not a recognised seed) gets its
        constants tuned by the offline mutator instead, so no lineage is stuck.
        """
        rng = random.Random(f"structural/{self.seed}/{key}")
        try:
            parent, _ = genome_of(split_candidate(parent_code).block, self.density_target)
        except CandidateFormatError as exc:
            return MutationResult(code=None, error=str(exc), kind="structural", summary="")
        if parent is None:
            result = OfflineMutator(seed=self.seed).propose(parent_code, partner_code, key, step_scale)
            return dataclasses.replace(result, summary=f"{result.summary} (no genome in the parent: constants only)")
        child, kind, summary = None, "structural", ""
        if partner_code is not None and rng.random() < self.crossover_rate:
            partner = self._partner(partner_code)
            if partner is not None and partner != parent:
                child = crossover(parent, partner, rng)
                kind, summary = "crossover", f"crossover -> {describe(child)}"
        if child is None or child == parent:
            try:
                child, changes = mutate(parent, rng, step_scale)
            except GenomeError as exc:
                return MutationResult(code=None, error=str(exc), kind="structural", summary="")
            kind, summary = "structural", f"{'; '.join(changes)} -> {describe(child)}"
        result = apply_rewrite(parent_code, render_block(child), summary)
        return dataclasses.replace(result, kind=kind, repairable=False)

    def _partner(self, code: str) -> Genome | None:
        try:
            return genome_of(split_candidate(code).block, self.density_target)[0]
        except CandidateFormatError:
            return None

    def proposal(self, parent_code: str, partner_code: str | None = None, key: int | str = 0) -> Proposal:
        """The same mutation wrapped like an LLM proposal (model "structural", zero usage)."""
        return Proposal(result=self.propose(parent_code, partner_code, key), model="structural", usage=Usage(),
                        turns=0, replies=())
