"""The structural mutator: genomes render to valid maskers, read back, replay, and a short run improves."""
from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest

from adrs.archive import open_run
from adrs.config import parse_config
from adrs.evaluate import CodeScorer
from adrs.loop import evolve
from adrs.offline import OfflineMutator
from adrs.structural import StructuralMutator
from adrs.structural.equivalents import equivalent_genome, genome_of
from adrs.structural.genome import (
    Allocation, Genome, Sample, Scorer, Sink, Threshold, TopK, Window, from_json, normalize, to_json,
)
from adrs.structural.mutate import crossover, mutate
from adrs.structural.render import read_genome, render_block
from conftest import ROOT
from evaluator.candidate import candidate_file, split_candidate
from evaluator.inprocess import score_file

SINK_WINDOW = (ROOT / "seeds" / "sink_window.py").read_text()
TARGET = 0.10


def as_candidate(genome: Genome) -> str:
    return split_candidate(SINK_WINDOW).join(render_block(genome))


@pytest.fixture(scope="module")
def few_records(tiny_workload):
    """Every fifth layer of both tiny samples: real activations, a fraction of the scoring time."""
    return dataclasses.replace(tiny_workload, records=tiny_workload.records[::5])


def random_genomes(n: int, seed: int = 0) -> list[Genome]:
    """Genomes reached by chains of mutations and crossovers from a few starting points."""
    rng = random.Random(seed)
    starts = [normalize(Genome((Sink(4), Window(1.0)))), normalize(Genome((TopK(1.0),))),
              normalize(Genome((Threshold(0.5, 2.0), Sample(0.5)), Scorer("pages", page=8))),
              normalize(Genome((Sink(2), Window(0.2), TopK(0.5), Sample(0.3)), Scorer("lowrank", rank=8),
                               Allocation("entropy", 1.5)))]
    pool, out = list(starts), []
    while len(out) < n:
        g, _ = mutate(rng.choice(pool), rng, scale=rng.choice((1.0, 2.0, 3.0)))
        if rng.random() < 0.3:
            g = crossover(g, rng.choice(pool), rng)
        pool.append(g)
        out.append(g)
    return out


def test_genomes_round_trip_through_json_and_rendered_code():
    for g in random_genomes(40, seed=1):
        assert from_json(to_json(g)) == g
        block = render_block(g)
        compile(as_candidate(g), "candidate.py", "exec")
        assert read_genome(block) == g


def test_tuned_constants_are_read_back_and_hand_edits_are_not_a_genome():
    g = normalize(Genome((Sink(4), Window(0.4), TopK(0.6))))
    block = render_block(g)
    tuned = block.replace("SINK_TOKENS = 4", "SINK_TOKENS = 9").replace("WINDOW_SHARE = 0.4", "WINDOW_SHARE = 0.25")
    back = read_genome(tuned)
    assert back is not None and back.get("sink").tokens == 9 and back.get("window").share == 0.25
    edited = block.replace("chosen |= top_per_query(free, room)", "chosen |= top_per_query(-free, room)")
    assert edited != block and read_genome(edited) is None
    # The structural mutator still makes progress on it: it tunes constants instead.
    r = StructuralMutator(seed=0).propose(split_candidate(SINK_WINDOW).join(edited), key=0)
    assert r.ok and "constants only" in r.summary


def test_seed_equivalent_genome_scores_like_the_seed(few_records):
    g, source = genome_of(split_candidate(SINK_WINDOW).block, TARGET)
    assert source == "equivalent" and g == normalize(Genome((Sink(4), Window(1.0))))
    with candidate_file(SINK_WINDOW) as p:
        seed = score_file(p, few_records, TARGET)
    with candidate_file(as_candidate(g)) as p:
        rendered = score_file(p, few_records, TARGET)
    assert rendered.valid and rendered.error == pytest.approx(seed.error, abs=1e-9)
    assert rendered.density == pytest.approx(seed.density)
    hybrid = (ROOT / "seeds" / "hybrid_sampling.py").read_text()
    assert equivalent_genome(split_candidate(hybrid).block, TARGET).kinds == ("sink", "window", "topk", "sample")


def test_random_genomes_render_to_valid_maskers_within_budget(few_records):
    genomes = random_genomes(24, seed=2)
    kinds = {k for g in genomes for k in g.kinds} | {g.scorer.kind for g in genomes if g.uses_scores}
    assert {"sink", "window", "topk", "threshold", "sample", "exact", "lowrank", "lowprec", "pages"} <= kinds
    for g in genomes:
        with candidate_file(as_candidate(g)) as p:
            report = score_file(p, few_records, TARGET)
        assert report.valid, (g, report.reason)
        assert report.density <= TARGET + 1e-9 and report.density_penalty == 0.0, g


def test_children_are_deterministic_valid_code():
    m = StructuralMutator(seed=3)
    a = [m.propose(SINK_WINDOW, key=i) for i in range(12)]
    assert [r.code for r in a] == [StructuralMutator(seed=3).propose(SINK_WINDOW, key=i).code for i in range(12)]
    assert [r.code for r in a] != [StructuralMutator(seed=4).propose(SINK_WINDOW, key=i).code for i in range(12)]
    assert all(r.ok and r.kind == "structural" for r in a)
    assert all(split_candidate(r.code).prefix == split_candidate(SINK_WINDOW).prefix for r in a)
    assert len({r.code for r in a}) >= 8


def test_crossover_takes_components_from_both_parents():
    a = normalize(Genome((Sink(4), Window(1.0))))
    b = normalize(Genome((TopK(0.5), Sample(0.5)), Scorer("lowrank", rank=8)))
    seen = set()
    for key in range(20):
        r = StructuralMutator(seed=0, crossover_rate=1.0).propose(as_candidate(a), as_candidate(b), key=key)
        if r.kind == "crossover":
            child = read_genome(split_candidate(r.code).block)
            assert set(child.kinds) <= {"sink", "window", "topk", "sample"}
            seen.update(child.kinds)
    assert {"window", "topk"} <= seen or {"sink", "sample"} <= seen


def test_offline_mutator_tunes_rendered_blocks():
    code = as_candidate(normalize(Genome((Sink(4), Window(0.3), TopK(0.7)))))
    r = OfflineMutator(seed=0).propose(code, key=1)
    assert r.ok and read_genome(split_candidate(r.code).block) is not None


def structural_run(tmp, workload, iterations: int):
    cfg = parse_config({"name": "s", "workload": "tiny", "heldout_workload": None, "iterations": iterations,
                        "llm": "structural", "seed_candidate": str(ROOT / "seeds" / "sink_window.py"),
                        "evaluation": {"in_process": True}})
    asyncio.run(evolve(tmp, cfg, CodeScorer(cfg, workload)))
    with open_run(tmp) as archive:
        rows = sorted(archive.all(), key=lambda r: r.iteration)
        return [(r.iteration, r.parent_id, r.status, r.combined_score, archive.code(r.id)) for r in rows], archive.best()


def test_structural_run_improves_on_the_seed_and_replays(tmp_path, few_records):
    rows, best = structural_run(tmp_path / "a", few_records, 8)
    seed_score = rows[0][3]
    assert best.combined_score > seed_score + 0.05, "the structural search found nothing better than sink+window"
    valid = [r for r in rows[1:] if r[2] == "valid"]
    assert len(valid) >= 6  # validity rate of children
    again, _ = structural_run(tmp_path / "b", few_records, 8)
    assert again == rows
