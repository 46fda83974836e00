"""Timing helpers shared by the benchmark scripts (no harness imports: a script may time another tree)."""
from __future__ import annotations

import contextlib
import statistics
import subprocess
import threading
import time
from typing import Any, Callable, ContextManager, Iterator


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


@contextlib.contextmanager
def flipped_scoring() -> Iterator[None]:
    """While in the block, the parent scores a fast score's selections the other way round from
    its default: after the worker where it would score alongside, and the reverse
    (``runner.score_after_worker`` of the tree on the path, imported only here)."""
    from evaluator.sandbox import runner

    policy = runner.score_after_worker
    runner.score_after_worker = lambda device: not policy(device)
    try:
        yield
    finally:
        runner.score_after_worker = policy


def steady_per_slot(sched: Any) -> int:
    """Timed evaluations per slot for a steady rate: four times the slot's warm spares (at least
    8). The warm-up leaves every spare made; with as many evaluations as spares, the rate would
    be that of spares made beforehand, not of making them (Ray's actors keep theirs: 8)."""
    return max(8, 4 * int(getattr(sched, "spares", 2)))


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


class BusySampler:
    """GPU busy share (NVML utilisation: time a kernel ran) per GPU, sampled by ``nvidia-smi``."""

    def __init__(self, gpus: int) -> None:
        self.gpus, self.samples = gpus, [[] for _ in range(gpus)]
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "BusySampler":
        try:
            self._proc = subprocess.Popen(["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits",
                                           "-lms", "200"], stdout=subprocess.PIPE, text=True)
        except OSError:
            return self
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                index, util = (int(x) for x in line.split(","))
            except ValueError:
                continue
            if index < self.gpus:
                self.samples[index].append(util)

    def __exit__(self, *exc: Any) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(5)

    def busy(self) -> list[float | None]:
        return [statistics.mean(s) / 100 if s else None for s in self.samples]


class SlotClock:
    """Harness-level occupancy per slot over the timed window: the share of it each slot's thread
    spent in ``evaluate`` (busy), and the share of it spent waiting for a sandbox worker to finish
    starting (``Worker.wait_ready``; no candidate runs then). Wraps the calls both trees have."""

    def __init__(self, sched: Any) -> None:
        self.slots = list(getattr(sched, "_slots", []))
        self.spans: dict[str, list[tuple[float, float]]] = {}  # thread name -> (start, end)
        self.waits: dict[str, list[tuple[float, float]]] = {}
        self.window = (0.0, 0.0)

    def __enter__(self) -> "SlotClock":
        from evaluator.sandbox import Worker

        def clocked(fn: Any, log: dict[str, list[tuple[float, float]]]) -> Any:
            def call(*a: Any, **kw: Any) -> Any:
                t = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    log.setdefault(threading.current_thread().name, []).append((t, time.perf_counter()))
            return call

        for slot in self.slots:  # an instance attribute: the serving thread looks it up per job
            slot.evaluate = clocked(slot.evaluate, self.spans)
        self._wait_ready = Worker.wait_ready
        Worker.wait_ready = clocked(Worker.wait_ready, self.waits)
        self.window = (time.perf_counter(), 0.0)
        return self

    def __exit__(self, *exc: Any) -> None:
        from evaluator.sandbox import Worker

        self.window = (self.window[0], time.perf_counter())
        Worker.wait_ready = self._wait_ready
        for slot in self.slots:
            del slot.evaluate

    def share(self, log: dict[str, list[tuple[float, float]]]) -> list[float]:
        t0, t1 = self.window
        return [sum(max(0.0, min(b, t1) - max(a, t0)) for a, b in log.get(thread, [])) / (t1 - t0)
                for thread in (f"adrs-{slot.name}" for slot in self.slots)]  # SlotScheduler's thread names
