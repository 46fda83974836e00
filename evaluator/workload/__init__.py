"""Workloads: a model plus texts plus decode positions, captured once and cached on disk.

The specs (``WorkloadSpec``, ``PRESETS``, ``resolve_spec``) need only pydantic; everything that
touches tensors (``Workload``, ``load_workload``, ``at_precision``, ``capture_workload``,
``workload_dir``) is imported on first use, so that a command reading a run's config does not
pay for importing torch (2 s).
"""
from __future__ import annotations

import importlib
from typing import Any

from evaluator.workload.spec import PRESETS, WorkloadSpec, resolve_spec

__all__ = ["Workload", "at_precision", "WorkloadSpec", "PRESETS", "load_workload", "resolve_spec", "capture_workload", "workload_dir"]

_LAZY = {"Workload": "loaded", "at_precision": "loaded", "load_workload": "loaded",
         "capture_workload": "capture", "workload_dir": "capture"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"evaluator.workload.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'evaluator.workload' has no attribute {name!r}")
