"""Parent selection: islands with ring migration plus a MAP-Elites grid over behaviour.

Works on plain ``ParentRecord`` rows (the loop builds them from the archive), so it can be
tested and replayed without one. Every draw comes from ``Random(f"parents/{seed}/{iteration}")``:
the choice at an iteration depends only on the seed, the iteration and the records, never on
how many draws came before, so a resumed or replayed run makes the same choices.

Policy per iteration (island ``iteration % num_islands``, children inherit the parent's island):
- exploit (``exploit_ratio``): one of the island's ``elite_pool`` best;
- explore (``explore_ratio``): any valid member of the island, uniformly;
- otherwise: the elite of a random occupied MAP-Elites cell of the island (quality-diversity).
Every ``migration_interval`` iterations the best of each island is copied to the next island
in the ring, so good ideas spread without collapsing every island onto one lineage.
"""
from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field, replace
from typing import Iterable, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Mode = Literal["exploit", "explore", "elite", "fallback"]


class Descriptor(BaseModel):
    """One behaviour axis: a record field (or ``features`` key) cut into bins at ``edges``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    edges: list[float] = Field(min_length=1)

    @field_validator("edges")
    @classmethod
    def _ascending(cls, v: list[float]) -> list[float]:
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError("descriptor edges must be strictly ascending")
        return v


def _default_descriptors() -> list[Descriptor]:
    return [
        Descriptor(name="density", edges=[0.02, 0.04, 0.06, 0.08, 0.09, 0.1, 0.11, 0.13]),
        Descriptor(name="error", edges=[0.01, 0.02, 0.05, 0.1, 0.2, 0.5]),
    ]


class SelectionConfig(BaseModel):
    """Knobs of parent selection."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_islands: int = Field(default=4, gt=0)
    migration_interval: int = Field(default=20, gt=0, description="iterations between migrations")
    migration_count: int = Field(default=1, gt=0, description="best records copied per island per migration")
    exploit_ratio: float = Field(default=0.7, ge=0, le=1)
    explore_ratio: float = Field(default=0.2, ge=0, le=1)
    elite_pool: int = Field(default=3, gt=0, description="exploit picks among this many best of the island")
    num_top: int = Field(default=2, ge=0, description="top inspirations shown to the model")
    num_diverse: int = Field(default=2, ge=0, description="inspirations from other MAP-Elites cells")
    descriptors: list[Descriptor] = Field(default_factory=_default_descriptors)

    @model_validator(mode="after")
    def _ratios(self) -> "SelectionConfig":
        if self.exploit_ratio + self.explore_ratio > 1 + 1e-9:
            raise ValueError("exploit_ratio + explore_ratio must be <= 1 (the rest goes to MAP-Elites cells)")
        return self


@dataclass(frozen=True)
class ParentRecord:
    """What selection needs to know about one archive member on one island.

    A migrated record appears once per island it lives on (same ``id``, other ``island``).
    """

    id: str
    island: int
    combined_score: float | None
    error: float | None
    density: float | None
    valid: bool
    features: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ParentChoice:
    """The parent for one iteration and the inspirations to show alongside it."""

    parent_id: str
    island: int
    mode: Mode
    top_ids: tuple[str, ...] = ()
    diverse_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Migrant:
    record_id: str
    from_island: int
    to_island: int


def _rank_key(r: ParentRecord) -> tuple[float, str]:
    """Best first; ties broken by id so that order never depends on input order."""
    return (-(r.combined_score if r.combined_score is not None else float("-inf")), r.id)


def _usable(r: ParentRecord) -> bool:
    return r.valid and r.combined_score is not None


def descriptor_value(record: ParentRecord, name: str) -> float | None:
    if name in record.features:
        return record.features[name]
    return getattr(record, name, None)


def cell_of(record: ParentRecord, descriptors: Sequence[Descriptor]) -> tuple[int, ...] | None:
    """The MAP-Elites cell (one bin index per descriptor); None if a descriptor is missing."""
    cell = []
    for d in descriptors:
        v = descriptor_value(record, d.name)
        if v is None:
            return None
        cell.append(bisect.bisect_right(d.edges, float(v)))
    return tuple(cell)


def map_elites_grid(records: Iterable[ParentRecord], descriptors: Sequence[Descriptor]) -> dict[tuple[int, ...], ParentRecord]:
    """Best valid record per occupied cell."""
    grid: dict[tuple[int, ...], ParentRecord] = {}
    for r in sorted((r for r in records if _usable(r)), key=_rank_key):
        cell = cell_of(r, descriptors)
        if cell is not None and cell not in grid:
            grid[cell] = r
    return grid


def island_of_iteration(iteration: int, num_islands: int) -> int:
    """Islands take turns, so each evolves at the same pace."""
    return iteration % num_islands


def should_migrate(iteration: int, config: SelectionConfig) -> bool:
    return config.num_islands > 1 and iteration > 0 and iteration % config.migration_interval == 0


def plan_migration(records: Sequence[ParentRecord], config: SelectionConfig) -> list[Migrant]:
    """Copy each island's best ``migration_count`` records to the next island of the ring."""
    migrants = []
    for island in range(config.num_islands):
        dest = (island + 1) % config.num_islands
        present = {r.id for r in records if r.island == dest}
        best = sorted((r for r in records if r.island == island and _usable(r)), key=_rank_key)
        seen: set[str] = set()
        for r in best:
            if len(seen) == config.migration_count:
                break
            if r.id in seen:
                continue
            seen.add(r.id)
            if r.id not in present:
                migrants.append(Migrant(r.id, island, dest))
    return migrants


def apply_migration(records: Sequence[ParentRecord], migrants: Sequence[Migrant]) -> list[ParentRecord]:
    """Records plus the migrants' copies on their new islands."""
    by_key = {(r.id, r.island): r for r in records}
    out = list(records)
    for m in migrants:
        src = by_key[(m.record_id, m.from_island)]
        if (m.record_id, m.to_island) not in by_key:
            copy = replace(src, island=m.to_island)
            by_key[(m.record_id, m.to_island)] = copy
            out.append(copy)
    return out


def select_parent(records: Sequence[ParentRecord], iteration: int, config: SelectionConfig, seed: int = 0) -> ParentChoice:
    """Pick the parent and inspirations for ``iteration`` (deterministic in seed and iteration)."""
    if not records:
        raise ValueError("no records to select a parent from (seed the archive first)")
    rng = random.Random(f"parents/{seed}/{iteration}")
    island = island_of_iteration(iteration, config.num_islands)
    members = sorted((r for r in records if r.island == island and _usable(r)), key=_rank_key)
    if not members:
        # An empty island (start of a run) borrows from the whole archive.
        members = sorted({r.id: r for r in records if _usable(r)}.values(), key=_rank_key)
    if not members:
        parent = sorted(records, key=lambda r: r.id)[0]
        return ParentChoice(parent.id, island, "fallback")
    draw = rng.random()
    if draw < config.exploit_ratio:
        mode: Mode = "exploit"
        parent = rng.choice(members[: config.elite_pool])
    elif draw < config.exploit_ratio + config.explore_ratio:
        mode = "explore"
        parent = rng.choice(members)
    else:
        mode = "elite"
        grid = map_elites_grid(members, config.descriptors)
        parent = grid[rng.choice(sorted(grid))] if grid else members[0]
    unique = sorted({r.id: r for r in records if _usable(r)}.values(), key=_rank_key)
    top = tuple(r.id for r in unique if r.id != parent.id)[: config.num_top]
    parent_cell = cell_of(parent, config.descriptors)
    grid_all = map_elites_grid(unique, config.descriptors)
    others = [grid_all[c].id for c in sorted(grid_all) if c != parent_cell and grid_all[c].id not in top and grid_all[c].id != parent.id]
    diverse = tuple(rng.sample(others, k=min(config.num_diverse, len(others))))
    return ParentChoice(parent.id, island, mode, top, diverse)


@dataclass(frozen=True)
class ParentSelector:
    """Convenience wrapper binding a config and a seed."""

    config: SelectionConfig = field(default_factory=SelectionConfig)
    seed: int = 0

    def select(self, records: Sequence[ParentRecord], iteration: int) -> ParentChoice:
        return select_parent(records, iteration, self.config, self.seed)

    def migrate(self, records: Sequence[ParentRecord], iteration: int) -> tuple[list[ParentRecord], list[Migrant]]:
        """At migration iterations, return the records with migrants added; else unchanged."""
        if not should_migrate(iteration, self.config):
            return list(records), []
        migrants = plan_migration(records, self.config)
        return apply_migration(records, migrants), migrants
