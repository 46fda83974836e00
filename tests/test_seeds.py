"""Seeds on the real model: the acceptance ordering of issue 2, plus loophole candidates."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from evaluator.candidate import split_candidate
from evaluator.inprocess import score_file

from conftest import ROOT, SEEDS

CANDIDATES = Path(__file__).parent / "candidates"


@pytest.fixture(scope="module")
def seed_scores(tiny_workload):
    return {p.stem: score_file(p, tiny_workload, 0.10) for p in SEEDS}


def test_seeds_are_candidates():
    assert {p.stem for p in SEEDS} >= {"sink_window", "oracle_topk", "hybrid_sampling", "vattention", "quest_pages",
                                     "group_hybrid"}
    for p in SEEDS:
        parts = split_candidate(p.read_text())
        assert "def masker" in parts.block


def test_every_seed_is_valid_within_target(seed_scores):
    for name, rep in seed_scores.items():
        assert rep.valid, (name, rep.reason)
        assert rep.density <= 0.10, name
        assert rep.density > 0.05 or name == "quest_pages", name
        assert rep.kv_density >= rep.density - 1e-12, name


def test_acceptance_ordering(seed_scores):
    assert seed_scores["oracle_topk"].error < seed_scores["hybrid_sampling"].error < seed_scores["sink_window"].error


def test_select_all_is_exact_and_select_nothing_is_invalid(tiny_workload):
    full = score_file(CANDIDATES / "select_all.py", tiny_workload, 0.10)
    assert full.valid and full.error < 1e-4 and full.density == 1.0
    assert full.combined_score == pytest.approx(-(full.error + 90.0))
    empty = score_file(CANDIDATES / "select_nothing.py", tiny_workload, 0.10)
    assert not empty.valid and empty.category == "invalid" and "empty" in empty.reason
    assert empty.combined_score is None


def test_scores_replicate(tiny_workload, seed_scores):
    again = score_file(ROOT / "seeds" / "hybrid_sampling.py", tiny_workload, 0.10)
    assert again.combined_score == seed_scores["hybrid_sampling"].combined_score


def test_cli_score_json(tiny_workload):
    proc = subprocess.run(
        [sys.executable, "-m", "adrs.cli", "score", str(ROOT / "seeds" / "sink_window.py"),
         "--workload", "tiny", "--json", "--in-process"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    for key in ("valid", "combined_score", "error", "density", "density_penalty", "per_layer", "wall_s"):
        assert key in data
    assert data["valid"] and len(data["per_layer"]) == 30
    assert set(data["per_layer"][0]) >= {"layer", "error", "density"}


def test_cli_invalid_candidate_exits_nonzero_with_reason(tiny_workload):
    proc = subprocess.run(
        [sys.executable, "-m", "adrs.cli", "score", str(CANDIDATES / "select_nothing.py"),
         "--workload", "tiny", "--json", "--in-process"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1
    data = json.loads(proc.stdout)
    assert data["valid"] is False and "empty" in data["reason"]


def test_cli_bad_input_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "adrs.cli", "score", "missing.py"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "no such candidate file" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_score_goes_through_the_sandbox(tiny_workload):
    """Without --in-process a hanging candidate is killed at its timeout and reported, not waited on."""
    proc = subprocess.run(
        [sys.executable, "-m", "adrs.cli", "score", str(ROOT / "tests" / "hostile" / "infinite_loop.py"),
         "--workload", "tiny", "--json", "--timeout", "3"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    data = json.loads(proc.stdout)
    assert data["valid"] is False and data["category"] == "timeout" and data["combined_score"] is None


def test_group_hybrid_shares_its_selection_per_kv_head(tiny_workload, seed_scores):
    """The GQA-shared seed returns [b, h_kv, q, k]; each group reads as many KV rows as it selects."""
    from evaluator.candidate import load_masker, masker_input

    rec = tiny_workload.records[5]
    raw = load_masker(ROOT / "seeds" / "group_hybrid.py")(masker_input(rec, 0.10, tiny_workload.spec.seed))
    b, h, q, k = rec.weights_shape
    assert tuple(raw.shape) == (b, rec.keys.shape[1], q, k)
    rep = seed_scores["group_hybrid"]
    assert rep.kv_density == pytest.approx(rep.density)
    # Per-head maskers at the same density read more KV rows per group.
    for name in ("hybrid_sampling", "oracle_topk"):
        assert seed_scores[name].kv_density > 1.3 * seed_scores[name].density
        assert seed_scores[name].density == pytest.approx(rep.density)


def test_group_hybrid_in_the_sandbox_matches_in_process(tiny_workload, seed_scores):
    from evaluator.sandbox import evaluate_in_sandbox

    boxed = evaluate_in_sandbox(ROOT / "seeds" / "group_hybrid.py", tiny_workload, 0.10)
    ref = seed_scores["group_hybrid"]
    assert boxed.valid, boxed.reason
    assert (boxed.combined_score, boxed.error, boxed.density, boxed.kv_density) == \
        (ref.combined_score, ref.error, ref.density, ref.kv_density)
