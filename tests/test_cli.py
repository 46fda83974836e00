"""The real CLI entry point on real run directories, and a run SIGKILLed at random moments."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


def adrs(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "adrs.cli", *args], capture_output=True, text=True, timeout=timeout, env=ENV)
    if check:
        assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc


def write_config(path: Path, iterations: int, **extra: str) -> Path:
    text = (ROOT / "configs" / "default.yaml").read_text()
    text = text.replace("workload: small ", "workload: tiny ").replace("heldout_workload: small-heldout", "heldout_workload: tiny-heldout")
    text = re.sub(r"^iterations: \d+", f"iterations: {iterations}", text, count=1, flags=re.M)
    text = text.replace("seed_candidate: seeds/sink_window.py", f"seed_candidate: {ROOT / 'seeds' / 'sink_window.py'}")
    for key, value in extra.items():
        text = text.replace(f"  {key}: ", f"  {key}: {value}  # was ")
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_workload):
    tmp = tmp_path_factory.mktemp("cli")
    cfg = write_config(tmp / "cfg.yaml", 3)
    adrs("run", str(cfg), "--run-dir", str(tmp / "run"))
    return tmp / "run"


def test_run_leaderboard_show_diff(cli_run):
    board = json.loads(adrs("leaderboard", str(cli_run), "--json").stdout)
    assert board and board[0]["combined_score"] == max(r["combined_score"] for r in board)
    assert {r["iteration"] for r in board} <= {0, 1, 2, 3}
    shown = adrs("show", str(cli_run), "best").stdout
    assert "EVOLVE-BLOCK-START" in shown and "combined_score" in shown
    assert "SINK_TOKENS" in adrs("diff", str(cli_run), "0", "1").stdout
    assert adrs("show", str(cli_run), "c000001").stdout.count("--- a/candidate.py") == 1


def test_resume_extends_and_reindex_gives_same_leaderboard(cli_run):
    adrs("resume", str(cli_run), "--iterations", "5")
    before = adrs("leaderboard", str(cli_run), "--json", "--top", "50").stdout
    assert len(json.loads(before)) >= 1
    (cli_run / "index.sqlite").write_bytes(b"garbage" * 100)
    adrs("reindex", str(cli_run))
    assert json.loads(adrs("leaderboard", str(cli_run), "--json", "--top", "50").stdout) == json.loads(before)


def test_bad_input_is_one_clear_line(tmp_path, cli_run):
    cases = [
        (("leaderboard", str(tmp_path / "nope")), "not a run directory"),
        (("show", str(cli_run), "c999999"), "unknown candidate"),
        (("run", str(tmp_path / "missing.yaml")), "no such config file"),
        (("run", str(write_config(tmp_path / "bad.yaml", 1, timeout_s="5\n  timout_s: 3"))), "evaluation.timout_s"),
    ]
    for args, message in cases:
        proc = adrs(*args, check=False)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_init_writes_a_loadable_config(tmp_path):
    from adrs.config import load_config

    adrs("init", str(tmp_path / "a.yaml"))
    assert load_config(tmp_path / "a.yaml").density_target == 0.10
    assert adrs("init", str(tmp_path / "a.yaml"), check=False).returncode == 2


def test_sigkill_at_random_moments_loses_nothing(tmp_path, tiny_workload):
    from adrs.archive import open_run

    # Enough iterations that ten kills come before the end on a fast box (40 finished after four
    # kills on one), few enough that the final resume stays short on a slow one.
    total = 150
    cfg = write_config(tmp_path / "cfg.yaml", total, in_process="true")
    run_dir = tmp_path / "run"
    rng = random.Random(1234)
    seen: set[str] = set()
    kills = 0
    args = ["run", str(cfg), "--run-dir", str(run_dir)]
    while kills < 10:
        proc = subprocess.Popen([sys.executable, "-m", "adrs.cli", *args], env=ENV, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.5, 5.0))
        if proc.poll() is not None:
            break  # finished before the kill
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        if (run_dir / "config.yaml").exists():
            args = ["resume", str(run_dir)]
        if (run_dir / "repo").exists():
            with open_run(run_dir) as archive:
                ids = {r.id for r in archive.all()}
            assert seen <= ids, f"lost {seen - ids}"
            seen = ids
    assert kills == 10, "the run finished before it was killed ten times"
    adrs("resume", str(run_dir))
    with open_run(run_dir) as archive:
        rows = archive.all()
        assert sorted(r.iteration for r in rows) == list(range(total + 1))
        board = [(r.id, r.combined_score) for r in archive.leaderboard(100)]
        valid = [r for r in rows if r.status == "valid"]
        assert archive.best().combined_score == max(r.combined_score for r in valid)
        best_commit = archive.repo.git.rev_parse("refs/heads/best")
        assert best_commit == archive.best().commit
    adrs("reindex", str(run_dir))
    with open_run(run_dir) as archive:
        assert [(r.id, r.combined_score) for r in archive.leaderboard(100)] == board


def test_score_speedup_flag_reports_why_nothing_was_timed_on_cpu(tiny_workload):
    import torch

    proc = adrs("score", str(ROOT / "seeds" / "sink_window.py"), "--workload", "tiny", "--speedup", "--json")
    data = json.loads(proc.stdout)
    assert data["valid"] and "speedup" in data
    if not torch.cuda.is_available():
        assert data["speedup"]["measured"] is False and "no CUDA" in data["speedup"]["reason"]
        assert data["speedup"]["mean_speedup"] is None
    else:
        assert data["speedup"]["measured"] and data["speedup"]["overall_speedup"] > 0
