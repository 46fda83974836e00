"""The structural mutator's genome: a masker as a small typed composition of primitives.

A genome is a set of *components* that each claim part of every query's token budget
(sinks, a recent window, top-k or threshold picks by a token *scorer*, and a uniform sample
weighted ``1/p``), a scorer (exact logits or a cheaper sketch) and an *allocation* rule that
can move the score-based budget across heads by score entropy. Components apply in a fixed
order, deterministic picks first and the sample last (it estimates what the picks left), and
the last share component takes whatever budget remains, so a genome never exceeds its budget.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal, Union

ScorerKind = Literal["exact", "lowrank", "lowprec", "pages"]
SCORER_KINDS: tuple[ScorerKind, ...] = ("exact", "lowrank", "lowprec", "pages")
HeadAllocation = Literal["uniform", "entropy"]


@dataclass(frozen=True)
class Scorer:
    """How candidate tokens are ranked: exact logits or a sketch of them."""

    kind: ScorerKind = "exact"
    rank: int = 16  # lowrank: query dimensions kept per query (SparQ-style)
    bits: int = 4  # lowprec: bits per key channel
    page: int = 16  # pages: tokens per page (Quest-style min/max bound)


@dataclass(frozen=True)
class Sink:
    """The first ``tokens`` keys (attention sinks)."""

    tokens: int = 4
    kind: Literal["sink"] = "sink"


@dataclass(frozen=True)
class Window:
    """The most recent keys, ``share`` of the budget."""

    share: float = 1.0
    kind: Literal["window"] = "window"


@dataclass(frozen=True)
class TopK:
    """The best-scoring remaining keys, ``share`` of the budget."""

    share: float = 1.0
    kind: Literal["topk"] = "topk"


@dataclass(frozen=True)
class Threshold:
    """Remaining keys scoring within ``margin`` (in logits) of the row's best, at most ``share`` of the budget."""

    share: float = 1.0
    margin: float = 4.0
    kind: Literal["threshold"] = "threshold"


@dataclass(frozen=True)
class Sample:
    """A uniform sample of the remaining causal keys without replacement, each weighted ``1/p``."""

    share: float = 1.0
    kind: Literal["sample"] = "sample"


Component = Union[Sink, Window, TopK, Threshold, Sample]
# Application order: deterministic picks first; the sample estimates the rest, so it comes last.
COMPONENT_TYPES: tuple[type, ...] = (Sink, Window, TopK, Threshold, Sample)
KINDS: tuple[str, ...] = tuple(t.kind for t in (Sink(), Window(), TopK(), Threshold(), Sample()))
BY_KIND: dict[str, type] = dict(zip(KINDS, COMPONENT_TYPES))
SHARE_KINDS = ("window", "topk", "threshold", "sample")
SCORE_KINDS = ("topk", "threshold")


@dataclass(frozen=True)
class Allocation:
    """How the score-based budget is spread across heads: evenly, or by score entropy."""

    heads: HeadAllocation = "uniform"
    power: float = 1.0  # entropy: budget grows as entropy ** power


@dataclass(frozen=True)
class Genome:
    """A masker: components (at most one of each kind, in application order), scorer, allocation."""

    components: tuple[Component, ...]
    scorer: Scorer = Scorer()
    allocation: Allocation = Allocation()

    def get(self, kind: str) -> Component | None:
        """The component of ``kind``, if present."""
        return next((c for c in self.components if c.kind == kind), None)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(c.kind for c in self.components)

    @property
    def uses_scores(self) -> bool:
        return any(k in SCORE_KINDS for k in self.kinds)

    def last_share_kind(self) -> str | None:
        """The share component that takes the rest of the budget (the last one applied)."""
        shares = [k for k in self.kinds if k in SHARE_KINDS]
        return shares[-1] if shares else None


class GenomeError(ValueError):
    """Data that is not a usable genome."""


def _round(x: float, digits: int = 3) -> float:
    return float(round(x, digits))


def normalize(genome: Genome) -> Genome:
    """Canonical form: application order, one component per kind, shares summing to 1, sane constants."""
    by_kind: dict[str, Component] = {}
    for c in genome.components:
        by_kind.setdefault(c.kind, c)
    comps = [by_kind[k] for k in KINDS if k in by_kind]
    if not comps:
        raise GenomeError("a genome needs at least one component")
    raw = [max(float(getattr(c, "share")), 1e-3) for c in comps if c.kind in SHARE_KINDS]
    total = sum(raw)
    fixed: list[Component] = []
    running, seen = 0.0, 0
    for c in comps:
        if isinstance(c, Sink):
            fixed.append(Sink(tokens=min(max(int(c.tokens), 1), 256)))
            continue
        seen += 1
        # Three decimals keep the rendered constants short; the last share takes the remainder.
        share = max(_round(1.0 - running) if seen == len(raw) else _round(raw[seen - 1] / total), 0.001)
        running += share
        if isinstance(c, Threshold):
            fixed.append(Threshold(share=share, margin=_round(min(max(c.margin, 0.1), 30.0), 2)))
        else:
            fixed.append(dataclasses.replace(c, share=share))
    s = genome.scorer
    scorer = Scorer(kind=s.kind, rank=min(max(int(s.rank), 1), 256), bits=min(max(int(s.bits), 2), 8),
                    page=min(max(int(s.page), 2), 128))
    allocation = Allocation(genome.allocation.heads, _round(min(max(genome.allocation.power, 0.05), 4.0), 2))
    return Genome(tuple(fixed), scorer, allocation)


def to_json(genome: Genome) -> str:
    """One-line JSON of a genome (embedded as a comment in the rendered block)."""
    return json.dumps(dataclasses.asdict(genome), separators=(",", ":"), sort_keys=True)


def from_data(data: Any) -> Genome:
    """A genome from ``to_json`` data; GenomeError on anything else."""
    try:
        comps = []
        for item in data["components"]:
            item = dict(item)
            cls = BY_KIND[item.pop("kind")]
            comps.append(cls(**item))
        scorer = Scorer(**data.get("scorer", {}))
        allocation = Allocation(**data.get("allocation", {}))
    except (KeyError, TypeError, AttributeError) as exc:
        raise GenomeError(f"not a genome: {exc}") from None
    if scorer.kind not in SCORER_KINDS or allocation.heads not in ("uniform", "entropy") or not comps:
        raise GenomeError("not a genome: unknown scorer or allocation, or no components")
    return Genome(tuple(comps), scorer, allocation)


def from_json(text: str) -> Genome:
    """Inverse of ``to_json``."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GenomeError(f"genome comment is not JSON: {exc}") from None
    return from_data(data)


def describe(genome: Genome, numbers: bool = True) -> str:
    """Short human summary, e.g. ``sink(4) + window 0.3 + topk 0.7 [exact]``."""
    parts = []
    for c in genome.components:
        if not numbers:
            parts.append(c.kind)
        elif isinstance(c, Sink):
            parts.append(f"sink({c.tokens})")
        elif isinstance(c, Threshold):
            parts.append(f"threshold {c.share:g} (margin {c.margin:g})")
        else:
            parts.append(f"{c.kind} {c.share:g}")
    text = " + ".join(parts)
    if genome.uses_scores:
        s = genome.scorer
        detail = {"exact": "", "lowrank": f" r={s.rank}", "lowprec": f" {s.bits}-bit", "pages": f" page={s.page}"}[s.kind]
        text += f" [{s.kind}{detail if numbers else ''}"
        power = f"^{genome.allocation.power:g}" if numbers else ""
        text += f", entropy{power} across heads]" if genome.allocation.heads == "entropy" else "]"
    return text
