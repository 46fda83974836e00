"""Decode speed in the loop: kv_density and the measured speedup in the archive, the speedup objective."""
from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from adrs.archive import open_run
from adrs.config import ConfigError, parse_config
from adrs.evaluate import CodeScorer, make_scorer, speedup_note
from adrs.loop import evolve
from adrs.objective import apply_objective, speedup_penalty
from conftest import ROOT
from evaluator.errors import SpeedupUnavailable
from evaluator.scoring import ScoreReport
from evaluator.speedup import unavailable_reason

CUDA = torch.cuda.is_available()


def config(**overrides):
    base = {"name": "t", "workload": "tiny", "heldout_workload": "tiny-heldout", "iterations": 3,
            "seed_candidate": str(ROOT / "seeds" / "group_hybrid.py"), "evaluation": {"in_process": True}}
    base.update(overrides)
    return parse_config(base)


def test_speedup_penalty_mirrors_the_density_penalty():
    cfg = config(objective="speedup", speedup_target=4.0, evaluation={"in_process": True, "speedup": True})
    assert speedup_penalty(4.0, 4.0) == 0.0 and speedup_penalty(6.0, 4.0) == 0.0
    assert speedup_penalty(2.0, 4.0) == pytest.approx(25.0)  # decode takes 50% of dense time, the target 25%
    rep = apply_objective(ScoreReport(valid=True, combined_score=-0.3, error=0.3, density=0.1, density_penalty=0.0),
                          cfg, 3.8)
    assert rep.speedup == 3.8 and rep.speedup_penalty == pytest.approx(100 * (1 / 3.8 - 1 / 4))
    assert rep.combined_score == pytest.approx(-(0.3 + rep.speedup_penalty))
    # Unmeasured: a valid candidate cannot be ranked, and says why.
    bad = apply_objective(ScoreReport(valid=True, combined_score=-0.3, error=0.3, density=0.1,
                                      speedup_info={"measured": False, "reason": "no CUDA device"}), cfg, None)
    assert not bad.valid and bad.category == "harness" and "no CUDA device" in bad.reason
    assert bad.combined_score is None and bad.error == 0.3
    # The density objective leaves the report alone; invalid reports stay as they are.
    plain = ScoreReport(valid=True, combined_score=-0.3, error=0.3, density=0.1)
    assert apply_objective(plain, config(), 2.0).combined_score == -0.3
    failed = ScoreReport.failure("invalid", "empty")
    assert apply_objective(failed, cfg, None) is failed


@pytest.mark.parametrize("overrides, message", [
    ({"objective": "speedup"}, "needs speedup_target"),
    ({"objective": "speedup", "speedup_target": 4}, "needs evaluation.speedup: true"),
    ({"speedup_target": 4}, "used only with objective: speedup"),
    ({"objective": "speedup", "speedup_target": 0.5, "evaluation": {"speedup": True}}, "greater than 1"),
    ({"evaluation": {"speedup_record": 3}}, "did you mean 'speedup_records'"),
])
def test_config_rules_for_the_speedup_objective(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(**overrides)


@pytest.mark.skipif(CUDA, reason="the machine without CUDA")
def test_without_cuda_speedup_is_skipped_visibly_and_the_objective_refused(tmp_path, tiny_workload):
    cfg = config(evaluation={"in_process": True, "speedup": True})
    assert "no decode speedup is recorded on this machine" in speedup_note(cfg)
    asyncio.run(evolve(tmp_path / "run", cfg, CodeScorer(cfg, tiny_workload)))
    with open_run(tmp_path / "run") as archive:
        rows = [r for r in archive.all() if r.status == "valid"]
        assert rows and all(r.speedup is None and r.kv_density is not None for r in rows)
        record = archive.record(rows[0].id)
        assert record["speedup"] is None and record["speedup_info"]["reason"] == unavailable_reason()
    goal = config(objective="speedup", speedup_target=4.0, evaluation={"in_process": True, "speedup": True})
    with pytest.raises(SpeedupUnavailable, match="objective: speedup needs a measured decode speedup"):
        make_scorer(goal)
    text = (f"workload: tiny\nheldout_workload: null\niterations: 1\nseed_candidate: {ROOT / 'seeds' / 'sink_window.py'}\n"
            "objective: speedup\nspeedup_target: 4\nevaluation:\n  speedup: true\n")
    (tmp_path / "goal.yaml").write_text(text)
    proc = subprocess.run([sys.executable, "-m", "adrs.cli", "run", str(tmp_path / "goal.yaml"), "--run-dir",
                           str(tmp_path / "goal")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "objective: speedup needs a measured decode speedup" in proc.stdout + proc.stderr
    assert not (tmp_path / "goal" / "repo").exists()


def test_leaderboard_shows_kv_density_and_an_old_index_is_rebuilt(tmp_path, tiny_workload):
    cfg = config(iterations=2, seed_candidate=str(ROOT / "seeds" / "hybrid_sampling.py"))
    run_dir = tmp_path / "run"
    asyncio.run(evolve(run_dir, cfg, CodeScorer(cfg, tiny_workload)))
    board = json.loads(subprocess.run([sys.executable, "-m", "adrs.cli", "leaderboard", str(run_dir), "--json"],
                                      capture_output=True, text=True, timeout=120, check=True).stdout)
    assert board and all(r["kv_density"] > r["density"] for r in board)  # per-head picks: groups read more rows
    assert all(r["speedup"] is None for r in board)
    text = subprocess.run([sys.executable, "-m", "adrs.cli", "leaderboard", str(run_dir)], capture_output=True, text=True,
                          timeout=120, check=True).stdout
    assert "kv dens" in text and "speedup" not in text.splitlines()[1]  # no speedup column when none was measured
    # An index written before these columns existed: rebuilt from git on open, numbers intact.
    with open_run(run_dir) as archive:
        before = {r.id: (r.combined_score, r.kv_density) for r in archive.all()}
    conn = sqlite3.connect(run_dir / "index.sqlite")
    conn.execute("ALTER TABLE candidates DROP COLUMN speedup")
    conn.execute("ALTER TABLE candidates DROP COLUMN kv_density")
    conn.commit()
    conn.close()
    with open_run(run_dir) as archive:
        assert {r.id: (r.combined_score, r.kv_density) for r in archive.all()} == before
    # A record made before kv_density existed has none: the row says so, nothing breaks.
    from adrs.archive.model import Meta, row_from

    meta = Meta("c000009", 9, 0, None, "model", "old", 0.0)
    old = row_from(meta, {"valid": True, "combined_score": -0.1, "error": 0.1, "density": 0.1}, "f" * 40, None)
    assert old.kv_density is None and old.speedup is None and old.status == "valid"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or unavailable_reason() is not None, reason="needs CUDA and Triton")
def test_loop_records_measured_speedup_and_ranks_by_it(tmp_path, tiny_workload):
    wl = replace(tiny_workload, records=tuple(r.to("cuda") for r in tiny_workload.records))
    cfg = config(objective="speedup", speedup_target=1.5, heldout_workload=None,
                 evaluation={"in_process": True, "speedup": True, "speedup_records": 3, "speedup_queries": 1})
    asyncio.run(evolve(tmp_path / "run", cfg, CodeScorer(cfg, wl)))
    with open_run(tmp_path / "run") as archive:
        rows = [r for r in archive.all() if r.status != "failed"]
        assert rows
        for r in rows:
            record = archive.record(r.id)
            assert r.speedup is not None and r.speedup > 0 and record["speedup_info"]["measured"]
            assert record["speedup_info"]["records_timed"] == [0, len(wl.records) // 2, len(wl.records) - 1]
            penalty = speedup_penalty(r.speedup, 1.5)
            assert record["speedup_penalty"] == pytest.approx(penalty)
            assert r.combined_score == pytest.approx(-(r.error + penalty))
