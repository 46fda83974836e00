"""patch, rescore, review (with a paused run) and plot, through the real CLI on real run directories."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from test_cli import ENV, adrs, write_config


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, tiny_workload):
    tmp = tmp_path_factory.mktemp("review")
    cfg = write_config(tmp / "cfg.yaml", 2)
    adrs("run", str(cfg), "--run-dir", str(tmp / "run"))
    return tmp / "run"


def _rows(run: Path):
    from adrs.archive import open_run

    with open_run(run) as archive:
        return archive.all(), {r.id: archive.code(r.id) for r in archive.all()}


def test_patch_with_file_commits_a_human_child_scored_like_in_process(small_run, tmp_path, tiny_workload):
    from evaluator.inprocess import score_file

    before, codes = _rows(small_run)
    edited = codes["c000000"].replace("SINK_TOKENS = 4", "SINK_TOKENS = 16")
    assert edited != codes["c000000"]
    path = tmp_path / "edited.py"
    path.write_text(edited)
    proc = adrs("patch", str(small_run), "0", "--file", str(path), "-m", "more sinks")
    assert "c000000 (parent)" in proc.stdout and "(patched)" in proc.stdout
    after, codes = _rows(small_run)
    child = after[-1]
    assert len(after) == len(before) + 1
    assert (child.author, child.parent_id, child.summary) == ("human", "c000000", "patch: more sinks")
    assert codes[child.id] == edited
    expected = score_file(path, tiny_workload, 0.10)
    assert child.combined_score == pytest.approx(expected.combined_score, abs=1e-12)


def test_patch_with_scripted_editor(small_run, tmp_path):
    script = tmp_path / "editor.py"
    script.write_text("import sys, pathlib\np = pathlib.Path(sys.argv[1])\n"
                      "p.write_text(p.read_text().replace('SINK_TOKENS = 4', 'SINK_TOKENS = 8'))\n")
    env = {**ENV, "EDITOR": f"{sys.executable} {script}"}
    proc = subprocess.run([sys.executable, "-m", "adrs.cli", "patch", str(small_run), "c000000"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    rows, codes = _rows(small_run)
    assert rows[-1].author == "human" and "SINK_TOKENS = 8" in codes[rows[-1].id]

    for editor, message in (("true", "unchanged"), ("false", "exited with code 1")):
        proc = subprocess.run([sys.executable, "-m", "adrs.cli", "patch", str(small_run), "0"],
                              capture_output=True, text=True, env={**ENV, "EDITOR": editor}, timeout=600)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(_rows(small_run)[0]) == len(rows)  # nothing committed by the failed edits


def test_rescore_keeps_the_result_and_the_leaderboard_shows_it(small_run):
    held = json.loads(adrs("rescore", str(small_run), "0", "--json").stdout)
    assert held["id"] == "c000000" and held["rescore"]["workload"].startswith("tiny-heldout@")
    assert held["rescore"]["combined_score"] != held["search"]["combined_score"]  # other texts, other numbers
    same = json.loads(adrs("rescore", str(small_run), "0", "--workload", "tiny", "--json").stdout)
    assert same["rescore"]["combined_score"] == pytest.approx(same["search"]["combined_score"], abs=1e-12)
    board = {r["id"]: r for r in json.loads(adrs("leaderboard", str(small_run), "--json", "--top", "50").stdout)}
    assert board["c000000"]["heldout_score"] == pytest.approx(held["rescore"]["combined_score"])
    assert "held-out" in adrs("leaderboard", str(small_run)).stdout
    proc = adrs("rescore", str(small_run), "0", "--workload", "no-such-preset", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_plot_writes_a_png(small_run, tmp_path):
    out = tmp_path / "p.png"
    assert "wrote" in adrs("plot", str(small_run), "--out", str(out)).stdout
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def _wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"run exited early ({proc.returncode}): {proc.stdout.read()}")
        time.sleep(0.5)
    raise AssertionError("timed out waiting")


def test_paused_run_waits_for_review_then_continues(tmp_path, tiny_workload):
    cfg = write_config(tmp_path / "cfg.yaml", 4, every="2", mode="pause")
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "adrs.cli", "run", str(cfg), "--run-dir", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        def pending():
            if not (run / "repo").is_dir():
                return None
            listed = json.loads(adrs("review", str(run), "--json").stdout)
            return [c for c in listed if c["decision"] is None]

        waiting = _wait_for(pending, 600, proc)
        assert [c["name"] for c in waiting] == ["checkpoint/000002"]
        time.sleep(3)  # the run must be waiting, not proposing
        assert proc.poll() is None
        assert len(_rows(run)[0]) == 3
        adrs("review", str(run), "note", "try sampling the middle")
        assert proc.poll() is None  # a note does not decide the checkpoint
        adrs("review", str(run), "approve", "looks sane")
        assert proc.wait(timeout=600) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    rows, _ = _rows(run)
    assert [r.iteration for r in rows] == [0, 1, 2, 3, 4]
    listed = {c["name"]: c for c in json.loads(adrs("review", str(run), "--json").stdout)}
    assert listed["checkpoint/000002"]["decision"].startswith("approve")
    assert listed["checkpoint/000002"]["decision"] == "approve"  # the approval's text is a note, not the decision
    assert listed["checkpoint/000002"]["notes"] == ["try sampling the middle", "looks sane"]
    assert listed["checkpoint/000004"]["decision"] is None  # the last one waits for later review

    # Rejecting the checkpoint's candidate takes it out of the running for best and parents.
    subject = listed["checkpoint/000004"]["candidate"]
    adrs("review", str(run), "reject", "overfits the search texts", "--checkpoint", "4")
    from adrs import review
    from adrs.archive import open_run

    with open_run(run) as archive:
        assert archive.get(subject).status == "rejected"
        assert archive.best() is None or archive.best().id != subject
        notes = review.prompt_notes(archive)
    assert "try sampling the middle" in notes and "looks sane" in notes
    assert any("overfits the search texts" in n for n in notes)
    for args, message in ((("review", str(run), "bogus"), "unknown review action"),
                          (("review", str(run), "reject", "-c", "2"), "already decided"),
                          (("review", str(run), "approve", "-c", "99"), "no checkpoint")):
        failed = adrs(*args, check=False)
        assert failed.returncode == 2 and message in failed.stderr, failed.stderr


def test_resume_waits_while_a_checkpoint_is_pending(tmp_path, tiny_workload):
    cfg = write_config(tmp_path / "cfg.yaml", 1, every="1", mode="pause")
    run = tmp_path / "run"
    adrs("run", str(cfg), "--run-dir", str(run))  # the only checkpoint is at the end: no wait
    proc = subprocess.Popen([sys.executable, "-m", "adrs.cli", "resume", str(run), "--iterations", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        time.sleep(20)
        assert proc.poll() is None and len(_rows(run)[0]) == 2  # waiting on checkpoint/000001
        adrs("review", str(run), "approve")
        assert proc.wait(timeout=600) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(_rows(run)[0]) == 3


def test_faithful_score_and_rescore_through_the_cli(small_run):
    seed = str(ROOT / "seeds" / "sink_window.py")
    data = json.loads(adrs("score", seed, "--workload", "tiny", "--faithful", "--json").stdout)
    assert data["valid"] and data["spec"].startswith("faithful-tiny@") and data["density"] <= 0.10
    assert 0.0 <= data["agreement"] <= 1.0 and data["kl"] >= 0.0 and data["n_calls"] > 0
    again = json.loads(adrs("rescore", str(small_run), "0", "--faithful", "--workload", "faithful-tiny", "--json").stdout)
    assert again["combined_score"] == pytest.approx(data["combined_score"], abs=1e-12)  # same code, same numbers
    from adrs.archive import open_run

    with open_run(small_run) as archive:
        kept = [n for n in archive.rescores("c000000") if n["why"] == "faithful"]
    assert kept and kept[-1]["report"]["agreement"] == again["agreement"]
    bad = adrs("score", seed, "--workload", "nope", "--faithful", check=False)
    assert bad.returncode == 2 and "no faithful preset" in bad.stderr
