"""Timing helpers shared by the benchmark scripts (no harness imports: a script may time another tree)."""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Callable, ContextManager


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds ``fn()`` took (device work included: CUDA is synchronised around it) and its result."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def median_time(fn: Callable[[], Any], repeat: int, before: Callable[[], Any] | None = None) -> tuple[float, Any]:
    """Median of ``repeat`` ``timed(fn)`` (``before()`` untimed ahead of each) and the last result."""
    times, out = [], None
    for _ in range(repeat):
        if before is not None:
            before()
        t, out = timed(fn)
        times.append(t)
    return statistics.median(times), out


def saturate(sched: Any, code: str, slots: int, per_slot: int,
             during: ContextManager[Any] | None = None) -> dict[str, Any]:
    """Evaluations per minute of a scheduler kept full: every slot warmed (twice: its pool then
    knows the workload), then ``per_slot * slots`` copies of ``code`` submitted at once and
    timed to the last result (``during`` wraps the timed part)."""
    for f in [sched.submit(code) for _ in range(2 * slots)]:
        assert f.result().valid, "the seed must score"
    n = per_slot * slots
    with during or contextlib.nullcontext():
        t0 = time.perf_counter()
        reports = [f.result() for f in [sched.submit(code) for _ in range(n)]]
        elapsed = time.perf_counter() - t0
    assert all(r.valid for r in reports)
    return {"evaluations": n, "elapsed_s": elapsed, "per_minute": 60 * n / elapsed,
            "mean_eval_s": sum(r.wall_s for r in reports) / n}
