"""Shared fixtures: the real embedded model on the short 'tiny' workload."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEEDS = sorted((ROOT / "seeds").glob("*.py"))


@pytest.fixture(scope="session")
def tiny_workload():
    """The 'tiny' preset captured from SmolLM2 (the first use dequantizes and captures once)."""
    from evaluator.workload import load_workload

    return load_workload("tiny", progress=False)
