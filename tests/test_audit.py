"""The numerics audit: gains that exist only in float32 are flagged, never best, never parent."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from adrs.archive import open_run
from adrs.config import parse_config
from adrs.evaluate import CodeScorer
from adrs.commit import Child, commit_child, ensure_seed
from adrs.loop import island_view
from adrs.mutation import MutationResult
from conftest import ROOT
from evaluator.candidate import candidate_file
from evaluator.inprocess import score_file
from evaluator.scoring import at_precision, causal_weights, score_weights
from evaluator.workload import at_precision as workload_at_precision

SEED = (ROOT / "seeds" / "sink_window.py").read_text()
ORACLE = (ROOT / "seeds" / "oracle_topk.py").read_text()
RETURN = "    return selected.float().expand(b, h, -1, -1)\n"


def scaled(c: float) -> str:
    """The seed with every weight multiplied by ``c``: the estimator is exactly invariant to it."""
    assert RETURN in SEED
    return SEED.replace(RETURN, RETURN.rstrip("\n") + f" * {c!r}\n")


@pytest.fixture(scope="module")
def few_records(tiny_workload):
    return dataclasses.replace(tiny_workload, records=tiny_workload.records[::6])


def score(code: str, workload) -> float:
    with candidate_file(code) as path:
        return score_file(path, workload, 0.10).combined_score


def test_float64_records_score_in_float64(few_records):
    rec = few_records.records[0]
    rec64 = at_precision(rec, torch.float64)
    assert rec64.dense_out.dtype == torch.float64 and rec64.queries.dtype == torch.float64
    assert torch.allclose(rec64.dense_out.float(), rec.dense_out, rtol=1e-4, atol=1e-5)
    dense = causal_weights(tuple(rec.queries.shape[:3]) + (rec.keys.shape[2],), rec.positions, "cpu")
    err32, _ = score_weights(rec, dense * 3.0)
    err64, _ = score_weights(rec64, dense * 3.0)
    assert err64 < 1e-12 < err32  # dense attention in float64 matches its float64 reference to rounding
    assert workload_at_precision(few_records, torch.float64).label.endswith("/float64")


def planted_artifact(workload) -> str:
    """A weight scale whose float32 score beats the seed's: a gain made only of rounding."""
    seed = score(SEED, workload)
    for c in (3.0, 7.0, 1.5, 11.0, 100.0, 2.5, 1e3, 1e4, 5.0, 13.0, 17.0, 1.25, 42.0, 1e5, 6.0):
        if score(scaled(c), workload) > seed:
            return scaled(c)
    pytest.fail("no weight scale gained in float32 on this workload")


def test_planted_rounding_gain_is_flagged_and_shown(tmp_path, few_records):
    cfg = parse_config({"name": "audit", "workload": "tiny", "heldout_workload": None, "iterations": 2,
                        "seed_candidate": str(ROOT / "seeds" / "sink_window.py"), "evaluation": {"in_process": True}})
    scorer = CodeScorer(cfg, few_records)
    planted = planted_artifact(few_records)
    run = tmp_path / "run"
    (run).mkdir()
    (run / "config.yaml").write_text((ROOT / "configs" / "default.yaml").read_text().replace("small", "tiny"))
    with open_run(run, create=True) as archive:
        ensure_seed(archive, cfg, scorer, ROOT)
        seed = archive.best()
        child = Child(seed.id, 0, planted, scorer.score(planted), MutationResult(planted, None, "human", "scale weights"))
        assert child.report.combined_score > seed.combined_score  # it does beat the best in float32
        ref, reason = commit_child(archive, scorer, child, author="human", summary="scale weights")
        assert reason is not None and reason.startswith("numerics audit: the gain disappears in float64")
        assert ref.status == "rejected" and archive.best().id == seed.id
        assert archive.record(ref.id)["audit"]["valid"]
        assert not [r for r in island_view(archive.all(), 2, cfg) if r.id == ref.id][0].valid  # never a parent
        # A real gain passes the audit and becomes the best.
        real = Child(seed.id, 0, ORACLE, scorer.score(ORACLE), MutationResult(ORACLE, None, "human", "oracle"))
        ref2, reason2 = commit_child(archive, scorer, real, author="human", summary="oracle")
        assert reason2 is None and archive.best().id == ref2.id
        assert archive.record(ref2.id)["audit"]["error"] == pytest.approx(real.report.error, rel=1e-4)
    env = {**os.environ, "COLUMNS": "250"}
    out = subprocess.run([sys.executable, "-m", "adrs.cli", "leaderboard", str(run)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "flagged" in out.stdout and "numerics audit" in out.stdout and ref.id in out.stdout


def test_audit_can_be_turned_off(tmp_path, few_records):
    cfg = parse_config({"name": "a", "workload": "tiny", "heldout_workload": None, "seed_candidate":
                        str(ROOT / "seeds" / "sink_window.py"),
                        "evaluation": {"in_process": True, "numerics_audit": False}})
    scorer = CodeScorer(cfg, few_records)
    planted = planted_artifact(few_records)
    with open_run(tmp_path, create=True) as archive:
        ensure_seed(archive, cfg, scorer, ROOT)
        seed = archive.best()
        child = Child(seed.id, 0, planted, scorer.score(planted), MutationResult(planted, None, "human", "x"))
        ref, reason = commit_child(archive, scorer, child)
        assert reason is None and archive.best().id == ref.id


def test_audit_scores_sandboxed_in_float64(few_records):
    cfg = parse_config({"name": "a", "workload": "tiny", "heldout_workload": None,
                        "seed_candidate": str(ROOT / "seeds" / "sink_window.py")})
    scorer = CodeScorer(cfg, few_records)
    try:
        plain, audited = scorer.score(SEED), scorer.audit_score(SEED)
    finally:
        scorer.close()
    assert audited.valid and audited.workload.endswith("/float64") and not plain.workload.endswith("/float64")
    assert audited.error == pytest.approx(plain.error, rel=1e-4) and audited.density == plain.density
