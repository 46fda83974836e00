"""Candidate-controlled text reaches terminals inert; JSON keeps it exact."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from adrs.safetext import terminal_safe

HOSTILE = Path(__file__).parent / "hostile"
REPO = Path(__file__).resolve().parents[1]
NASTY = "\x1b]0;title\x07\x1b[2J[bold red]X[/bold red] [link=file:///etc/passwd]y[/link]\u202eevil\nnext\tcol"


def test_control_characters_escaped_and_markup_inert():
    safe = terminal_safe(NASTY)
    assert "\x1b" not in safe and "\x07" not in safe and "\u202e" not in safe
    assert "\\x1b" in safe and "\\u202e" in safe and "\n" in safe and "\t" in safe
    console = Console(record=True, width=200, force_terminal=True, color_system=None)
    console.print(safe)
    shown = console.export_text()
    assert "[bold red]X[/bold red]" in shown and "[link=file:///etc/passwd]" in shown  # shown, not interpreted


def test_plain_text_unchanged():
    assert terminal_safe("error 0.5 at layer 3", markup=False) == "error 0.5 at layer 3"
    assert terminal_safe("a [b]", markup=False) == "a [b]"


def test_adrs_score_shows_candidate_error_text_inert_and_json_exact():
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "adrs.cli", "score", str(HOSTILE / "escape_text.py"), "--workload", "tiny"]
    table = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert table.returncode == 1, table.stderr[-2000:]
    assert "\x1b" not in table.stdout and "\x07" not in table.stdout
    assert "[bold]MARKUP[/bold]" in table.stdout and "\\x1b[31mRED" in table.stdout
    raw = subprocess.run(cmd + ["--json"], env=env, capture_output=True, text=True, timeout=300)
    data = json.loads(raw.stdout)
    assert data["category"] == "exception"
    assert "\x1b[31mRED\x1b[0m [link=file:///etc/passwd]click[/link] [bold]MARKUP[/bold]\x07" in data["reason"]
    assert data["isolation"].startswith("namespaces")
