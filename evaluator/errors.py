"""Errors the harness must tell apart without importing the heavy parts of ``evaluator`` (torch)."""
from __future__ import annotations


class IsolationUnavailable(RuntimeError):
    """The kernel allows no sandbox isolation here and the caller did not opt out: nothing ran."""


class SpeedupUnavailable(RuntimeError):
    """A measured decode speedup is required (``objective: speedup``) but cannot be measured here (no CUDA or Triton)."""
