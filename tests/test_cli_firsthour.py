"""A researcher's first hour (issue 16), through the real entry point at 80 columns and piped."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from test_cli import write_config

ENV80 = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "80"}


def adrs(*args: str, check: bool = True, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "adrs.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env=env or ENV80)
    if check:
        assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc


def one_line_error(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    assert proc.returncode == code, proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def run80(tmp_path_factory, tiny_workload):
    """A run started with --iterations 2 although its config says 5, with a checkpoint every iteration."""
    tmp = tmp_path_factory.mktemp("firsthour")
    cfg = write_config(tmp / "cfg.yaml", 5, every="1")
    proc = adrs("run", str(cfg), "--run-dir", str(tmp / "run"), "--iterations", "2")
    assert "iteration      3/3" in proc.stdout and "in flight      0" in proc.stdout, proc.stdout
    return tmp / "run"


def test_resume_keeps_the_iteration_count_and_shows_the_archived_state(run80):
    proc = adrs("resume", str(run80))
    assert "iteration      3/3" in proc.stdout and "best score     -0." in proc.stdout, proc.stdout
    assert "in flight      0" in proc.stdout
    board = json.loads(adrs("leaderboard", str(run80), "--json", "--all").stdout)
    assert len(board) == 3  # not 1 + the config's 5
    adrs("resume", str(run80), "--iterations", "3")
    adrs("resume", str(run80))  # remembers 3 now
    assert len(json.loads(adrs("leaderboard", str(run80), "--json", "--all").stdout)) == 4


def test_leaderboard_at_80_columns_and_piped_keeps_ids_and_one_line_per_row(run80, tmp_path):
    long_summary = "a long summary " * 12
    edited = tmp_path / "e.py"
    with_sinks = (ROOT / "seeds" / "sink_window.py").read_text().replace("SINK_TOKENS = 4", "SINK_TOKENS = 6")
    edited.write_text(with_sinks)
    adrs("patch", str(run80), "0", "--file", str(edited), "-m", long_summary)
    text = adrs("leaderboard", str(run80), "--top", "50").stdout
    rows = [line for line in text.splitlines() if re.match(r"c\d{6}\s", line)]
    board = json.loads(adrs("leaderboard", str(run80), "--json", "--top", "50").stdout)
    assert [r.split()[0] for r in rows] == [b["id"] for b in board]  # full ids, in order, one line each
    for line, b in zip(rows, board):
        assert f"{b['combined_score']:.5f}" in line  # scores not cut
        assert line.endswith(b["summary"])  # piped: the summary whole, on its own row
    assert any(b["summary"].startswith("patch: a long summary a long") for b in board)


def test_failed_candidates_are_listed_with_their_reasons(run80, tmp_path):
    code = (ROOT / "seeds" / "sink_window.py").read_text()
    broken = code.replace("    return ", "    return 0.5 * ", 1)  # weights between 0 and 1: invalid
    assert broken != code
    path = tmp_path / "bad.py"
    path.write_text(broken)
    assert adrs("patch", str(run80), "0", "--file", str(path), "-m", "half weights", check=False).returncode == 1
    failed = json.loads(adrs("leaderboard", str(run80), "--failed", "--json").stdout)
    assert failed and failed[-1]["status"] == "failed" and failed[-1]["reason"]
    text = adrs("leaderboard", str(run80), "--failed").stdout
    assert failed[-1]["id"] in text and failed[-1]["category"] in text
    every = json.loads(adrs("leaderboard", str(run80), "--all", "--json", "--top", "100").stdout)
    assert {r["status"] for r in every} >= {"valid", "failed"}
    assert all(r["island"] == 0 for r in json.loads(adrs("leaderboard", str(run80), "--island", "0", "--json").stdout))
    per_island = json.loads(adrs("leaderboard", str(run80), "--islands", "--json").stdout)
    assert len({r["island"] for r in per_island}) == len(per_island)


def test_patch_refuses_a_syntax_error_and_a_dry_run_commits_nothing(run80, tmp_path):
    before = json.loads(adrs("leaderboard", str(run80), "--all", "--json", "--top", "100").stdout)
    code = (ROOT / "seeds" / "sink_window.py").read_text()
    bad = tmp_path / "syntax.py"
    bad.write_text(code.replace("def masker(", "def masker((", 1))
    line = one_line_error(adrs("patch", str(run80), "0", "--file", str(bad), check=False))
    assert "syntax error at line" in line and "nothing committed" in line
    good = tmp_path / "good.py"
    good.write_text(code.replace("SINK_TOKENS = 4", "SINK_TOKENS = 9"))
    proc = adrs("patch", str(run80), "0", "--file", str(good), "--dry-run")
    assert "not committed" in proc.stdout
    after = json.loads(adrs("leaderboard", str(run80), "--all", "--json", "--top", "100").stdout)
    assert after == before


def test_errors_are_one_line_and_say_things_once(run80, tmp_path):
    line = one_line_error(adrs("show", str(run80), "c999999", check=False))
    assert "unknown candidate" in line and line.count("c999999") == 1
    cfg = write_config(tmp_path / "two.yaml", 1, timeout_s="5\n  timout_s: 3\n  memroy_mb: 9")
    line = one_line_error(adrs("run", str(cfg), "--run-dir", str(tmp_path / "r"), check=False))
    assert "evaluation.timout_s: unknown key (did you mean 'timeout_s'?)" in line
    assert "evaluation.memroy_mb: unknown key (did you mean 'memory_mb'?)" in line
    preset = tmp_path / "preset.yaml"
    preset.write_text(write_config(tmp_path / "p0.yaml", 1).read_text().replace("workload: tiny ", "workload: tny "))
    line = one_line_error(adrs("run", str(preset), "--run-dir", str(tmp_path / "r"), check=False))
    assert "unknown workload preset 'tny' (did you mean 'tiny'?)" in line
    assert not (tmp_path / "r").exists()  # failed at load, before any run directory
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = one_line_error(adrs("run", str(write_config(tmp_path / "ok.yaml", 1)), "--run-dir", str(afile), check=False))
    assert "is a file, not a directory" in line


def test_review_note_without_a_pending_checkpoint_and_approve_notes(run80):
    listed = json.loads(adrs("review", str(run80), "--json").stdout)
    pending = [c for c in listed if c["decision"] is None]
    assert pending
    for _ in pending:
        adrs("review", str(run80), "approve", "looks sane")
    listed = {c["name"]: c for c in json.loads(adrs("review", str(run80), "--json").stdout)}
    first = listed[pending[0]["name"]]
    assert first["decision"] == "approve" and first["notes"] == ["looks sane"]
    adrs("review", str(run80), "note", "try top-k next")  # nothing pending: the newest checkpoint
    newest = json.loads(adrs("review", str(run80), "--json").stdout)[-1]
    assert newest["notes"][-1] == "try top-k next"
    from adrs import review
    from adrs.archive import open_run

    with open_run(run80) as archive:
        assert "try top-k next" in review.prompt_notes(archive)


def test_help_has_no_bool_metavars_and_describes_every_argument():
    import typer

    from adrs.cli import app
    from adrs.cli.score import PRESET_NAMES
    from evaluator.workload.spec import PRESETS

    top = adrs("-h").stdout
    assert "Commands:" in top and "<bool>" not in top
    assert re.fullmatch(r"adrs \S+\n", adrs("--version").stdout)
    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        text = adrs(name, "-h").stdout
        assert "<bool>" not in text and "Usage: adrs " + name in text, text
        for param in cmd.params:
            assert getattr(param, "help", None), f"{name}: {param.name} has no description"
    assert set(PRESET_NAMES) == set(PRESETS)
    score_help = " ".join(adrs("score", "-h").stdout.split())
    assert all(p in score_help for p in PRESETS)


def test_read_only_run_can_be_inspected(run80, tmp_path):
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("mounts a read-only copy in a private mount namespace: needs root and unshare")
    colleague = tmp_path / "colleague"
    shutil.copytree(run80, colleague)
    (colleague / "archive.lock").unlink(missing_ok=True)
    outdir = tmp_path / "out"
    outdir.mkdir()

    def read_only(*args: str) -> subprocess.CompletedProcess:
        """The CLI with ``colleague`` mounted read-only (a colleague's run, a read-only share)."""
        cli = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "adrs.cli", *args])
        script = (f"mount --bind {colleague} {colleague} && mount -o remount,bind,ro {colleague} && exec {cli}")
        return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=ENV80,
                              timeout=600, cwd=str(outdir))

    own = json.loads(adrs("leaderboard", str(run80), "--json", "--top", "100").stdout)
    board = read_only("leaderboard", str(colleague), "--json", "--top", "100")
    assert board.returncode == 0, board.stderr
    assert [r["id"] for r in json.loads(board.stdout)] == [r["id"] for r in own]
    shown = read_only("show", str(colleague), "best")
    assert shown.returncode == 0 and "EVOLVE-BLOCK-START" in shown.stdout, shown.stderr
    diffed = read_only("diff", str(colleague), "0", "1")
    assert diffed.returncode == 0 and "candidate.py" in diffed.stdout, diffed.stderr
    plotted = read_only("plot", str(colleague), "--out", str(outdir / "p.png"))
    assert plotted.returncode == 0 and (outdir / "p.png").stat().st_size > 10_000, plotted.stderr
    assert "--out" in one_line_error(read_only("plot", str(colleague)))
    assert "read-only" in one_line_error(read_only("review", str(colleague), "note", "x"))
    assert read_only("review", str(colleague)).returncode == 0
    assert not (colleague / "archive.lock").exists()
    line = one_line_error(read_only("run", str(write_config(outdir / "c.yaml", 1)), "--run-dir", str(colleague / "new")))
    assert "not writable" in line


def test_diff_scores_and_export(run80, tmp_path, tiny_workload):
    data = json.loads(adrs("diff", str(run80), "0", "1", "--scores", "--json").stdout)
    assert len(data["layers"]) == 30 and data["layers"][0]["a"]["error"] >= 0
    text = adrs("diff", str(run80), "0", "1", "--scores").stdout
    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert re.search(r"^\s+29\s", text, re.M) and "all" in text

    out = tmp_path / "best.py"
    adrs("export", str(run80), "best", "-o", str(out))
    best = json.loads(adrs("leaderboard", str(run80), "--json", "--top", "1").stdout)[0]
    header = out.read_text().split("# ---- the candidate contract")[0]
    assert best["id"] in header and f"combined_score {best['combined_score']:.6g}" in header
    # Runs with adrs and evaluator unimportable, and selects exactly what the archived candidate does.
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import sys, runpy, torch\n"
        "sys.modules['evaluator'] = None; sys.modules['adrs'] = None\n"
        f"ns = runpy.run_path({str(out)!r})\n"
        f"data = torch.load({str(tmp_path / 'inp.pt')!r})\n"
        "inp = ns['MaskerInput'](**data, generator=torch.Generator().manual_seed(0))\n"
        f"torch.save(ns['masker'](inp), {str(tmp_path / 'sel.pt')!r})\n")
    import torch

    from evaluator.candidate import load_masker
    from evaluator.contract import MaskerInput

    g = torch.Generator().manual_seed(1)
    data = {"queries": torch.randn(1, 9, 4, 64, generator=g), "keys": torch.randn(1, 3, 300, 64, generator=g),
            "scaling": 0.125, "query_positions": torch.arange(296, 300), "layer_idx": 2, "num_layers": 30,
            "density_target": 0.1}
    torch.save(data, tmp_path / "inp.pt")
    proc = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    archived = tmp_path / "archived.py"
    from adrs.archive import open_run

    with open_run(run80) as archive:
        archived.write_text(archive.code(best["id"]))
    expected = load_masker(archived)(MaskerInput(**data, generator=torch.Generator().manual_seed(0)))
    got = torch.load(tmp_path / "sel.pt")
    assert torch.equal(torch.as_tensor(expected), torch.as_tensor(got))
    demo = subprocess.run([sys.executable, str(out)], capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0 and "masker ran on random input" in demo.stdout, demo.stderr


def _interrupt_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, "exited before the interrupt"
        assert time.time() < deadline, "never got ready"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole foreground group


def test_ctrl_c_prints_the_resume_hint_last(tmp_path, tiny_workload):
    # Far more iterations than the interrupts let run: a run that finished first would exit 0 and
    # prove nothing, while one that ignores Ctrl-C fails on communicate's timeout.
    cfg = write_config(tmp_path / "cfg.yaml", 1000)
    run = tmp_path / "run"
    # The children must start with Ctrl-C live, as a terminal's foreground job does. A shell starts
    # a background job (``.ci/run &``) with SIGINT ignored, and an ignored signal stays ignored
    # across fork and exec: the runs then ignored the test's interrupt, as they should there.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _interrupt_runs(cfg, run)
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupt_runs(cfg: Path, run: Path) -> None:
    from adrs.archive import open_run

    def count() -> int:
        if not (run / "repo").is_dir():
            return 0
        with open_run(run) as archive:
            return len(archive.all())

    for args, ready in ((["run", str(cfg), "--run-dir", str(run)], lambda: count() >= 2),
                        (["resume", str(run)], lambda: count() >= 4),
                        (["resume", str(run)], lambda: True)):  # at once: while loading
        proc = subprocess.Popen([sys.executable, "-m", "adrs.cli", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=ENV80, start_new_session=True)
        try:
            if args[0] == "resume" and ready():
                time.sleep(1.5)
            _interrupt_when(proc, ready)
            output, _ = proc.communicate(timeout=60)  # promptly: no waiting for the candidate in flight
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 130, output
        last = [line for line in output.splitlines() if line.strip()][-1]
        assert last == f"stopped; everything committed is kept. Resume with: adrs resume {run}", output
        assert "Traceback" not in output

    score = subprocess.Popen([sys.executable, "-m", "adrs.cli", "score", str(ROOT / "seeds" / "sink_window.py"),
                              "--workload", "tiny"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=ENV80, start_new_session=True)
    time.sleep(3)
    os.killpg(score.pid, signal.SIGINT)
    output, _ = score.communicate(timeout=60)
    if score.returncode != 0:  # finished first on a fast machine otherwise
        assert score.returncode == 130 and output.strip().splitlines()[-1] == "interrupted", output


def test_plot_marks_failures_humans_and_outliers_apart(tmp_path):
    from matplotlib.ticker import MaxNLocator

    from adrs.archive import open_run
    from adrs.plot import build_figure

    code = (ROOT / "seeds" / "sink_window.py").read_text()

    def record(score: float | None, density: float = 0.1) -> dict:
        if score is None:
            return {"valid": False, "category": "invalid", "reason": "empty selection"}
        return {"valid": True, "combined_score": score, "error": -score, "density": density}

    with open_run(tmp_path / "run", create=True) as archive:
        archive.add_candidate(code, record(-0.40), iteration=0, author="seed", summary="seed")
        for i, score in enumerate([-0.39, -0.38, -9.0, None, -0.37, -0.36], start=1):
            archive.add_candidate(code + f"# {i}\n", record(score), parent=i - 1 if i != 5 else 3, author="model", summary=f"m{i}")
        archive.add_candidate(code + "# human\n", record(-0.30), parent=6, author="human", summary="patch")
        fig = build_figure(archive, 0.1)
    ax_score, ax_trade, ax_line = fig.axes[:3]
    labels = ax_score.get_legend_handles_labels()[1]
    assert "human patch" in labels and "model candidate" in labels and any(lab.startswith("failed (1") for lab in labels)
    failed = next(line for line in ax_score.get_lines() if line.get_label().startswith("failed"))
    assert list(failed.get_ydata()) == [0.0] and failed.get_transform() == ax_score.get_xaxis_transform()  # on the edge
    low, high = ax_score.get_ylim()
    assert low > -1.0 and high >= -0.30  # the -9.0 outlier does not squash the band
    assert ax_trade.get_xlabel() == "iteration"  # every candidate at the target density: no vertical stripe
    assert isinstance(ax_line.xaxis.get_major_locator(), MaxNLocator)
    assert all(float(t).is_integer() for t in ax_line.get_xticks())
