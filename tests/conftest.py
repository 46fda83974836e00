"""Shared fixtures: the real embedded model on the short 'tiny' workload."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEEDS = sorted((ROOT / "seeds").glob("*.py"))


@pytest.fixture(scope="session")
def tiny_workload():
    """The 'tiny' preset captured from SmolLM2 (the first use dequantizes and captures once)."""
    from evaluator.workload import load_workload

    return load_workload("tiny", progress=False)


def _stat(entry: Path) -> tuple[int, bytes] | None:
    """(parent pid, command line) of a /proc entry, or None if it ended while we looked."""
    try:
        return int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]), (entry / "cmdline").read_bytes()
    except (OSError, IndexError, ValueError):
        return None


def sandbox_workers_of(parent: int) -> list[int]:
    """Host pids of ``parent``'s sandbox workers that have taken a job.

    ``parent`` starts the launcher (a fresh interpreter), or a fork server forks it; the
    launcher's child (in its own PID namespace) is the worker, still running the fork server's
    command line when forked. A worker that took its job has put /dev/null on its stdin.
    """
    procs = {int(e.name): info for e in Path("/proc").iterdir() if e.name.isdigit() and (info := _stat(e))}
    children = lambda of, name: {pid for pid, (ppid, cmd) in procs.items() if ppid in of and name in cmd}  # noqa: E731
    servers = children({parent}, b"sandbox/forkserver.py")
    launchers = children({parent}, b"sandbox/launcher.py") | children(servers, b"sandbox/forkserver.py")
    found = []
    for pid in children(launchers | {parent}, b"evaluator.sandbox.worker") | children(launchers, b"sandbox/forkserver.py"):
        try:
            if os.readlink(f"/proc/{pid}/fd/0") == "/dev/null":
                found.append(pid)
        except OSError:
            continue
    return found
