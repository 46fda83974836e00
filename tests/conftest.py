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


def sandbox_workers_of(parent: int) -> list[int]:
    """Pids of ``parent``'s sandbox workers that have taken a job (their cwd is a scratch directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cwd = os.readlink(entry / "cwd")
        except (OSError, IndexError, ValueError):  # the process ended while we looked
            continue
        if ppid == parent and b"evaluator.sandbox.worker" in cmd and "adrs-sandbox-" in cwd:
            found.append(int(entry.name))
    return found
