"""Warm sandbox workers kept ahead of the candidates that will need them (``WorkerPool``), and how
many a slot keeps when the config leaves it to us (``auto_spares``)."""
from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterator

from evaluator.errors import IsolationUnavailable
from evaluator.sandbox.limits import SandboxLimits
from evaluator.sandbox.spawn import ForkServer
from evaluator.sandbox.worker_process import Worker, fork_server_env, forkable

FORK_SERVER_ENV = "ADRS_FORK_SERVER"  # "0": start every worker as a fresh interpreter (for measurement)
SMALL_MACHINE_CORES = 4  # at most this many cores: start spare workers only between candidates
# Automatic spares per CUDA slot, at most: a worker's start-up (~4 s: torch import, CUDA context,
# preloaded inputs) over a fast score (~0.5 s) is ~8 evaluations to hide it behind.
MAX_AUTO_SPARES = 8
# What a warm spare holds on its GPU for the default workload: a CUDA context and the preloaded inputs.
SPARE_GPU_BYTES = 2 << 30


def auto_spares(cuda: bool, slots: int, cores: int | None = None, gpu_bytes: int | None = None) -> int:
    """Warm workers per pool when the config leaves it to us (``evaluation.spares: null``).

    ``slots``: pools on this host; ``gpu_bytes``: the memory of one slot's GPU, if known. One on
    CPU slots and on small machines, where a starting worker steals the candidate's cores. On
    CUDA slots up to ``MAX_AUTO_SPARES``, so that a spare's start-up overlaps the evaluations
    ahead of it, bounded twice: every starting worker keeps a core busy, so all pools' spares
    together may take at most half of the cores (the rest score, serve the loop and the LLM);
    and each spare holds ~``SPARE_GPU_BYTES`` on its GPU, so they may take at most a fifth of it.
    """
    cores = cores or os.cpu_count() or 1
    if not cuda or cores <= SMALL_MACHINE_CORES:
        return 1
    bound = min(MAX_AUTO_SPARES, cores // (2 * max(1, slots)))
    if gpu_bytes is not None:
        bound = min(bound, gpu_bytes // (5 * SPARE_GPU_BYTES))
    return max(1, bound)


class WorkerPool:
    """Keeps ``spares`` warm workers (torch imported, no candidate run) to hide start-up time.

    Every worker still serves exactly one candidate; the pool only starts the next ones early.
    ``take`` hands out the oldest spare that is ready (else the oldest one alive: the caller
    waits for it) and starts replacements at once, unless inside ``deferred_spare()`` on a
    machine of at most ``SMALL_MACHINE_CORES`` cores: then they start at ``replenish()``
    (``run_candidate`` calls it once the candidate is scored), so the replacement's start-up
    (interpreter, torch, CUDA context: seconds of CPU) does not compete with the candidate's
    run or the scoring for cores; on 2 cores it made the worker's job 6x slower. Spares that
    died while waiting are released and replaced, never handed out. ``wait_ready`` replenishes too.
    Threads may share a pool (``take``, ``replenish`` and ``close`` hold its lock).

    Unless the isolation is the explicit opt-out (or ``ADRS_FORK_SERVER=0``), workers are forked
    from the pool's fork server (``evaluator.sandbox.spawn``), which imported torch once.
    """

    def __init__(self, limits: SandboxLimits | None = None, cuda: bool = False, device: str | None = None,
                 spares: int = 1) -> None:
        """``device``: the one device this pool's candidates run on (a scheduler slot's GPU), if known:
        its workers warm up there, and once ``prefetch`` named a workload they load its inputs there too.
        ``spares``: warm workers kept (each preloaded one holds a CUDA context and the inputs on the GPU)."""
        if spares < 1:
            raise ValueError(f"a WorkerPool keeps at least one spare, not {spares}")
        self.limits = limits or SandboxLimits()
        self.cuda = cuda
        self.device = device
        self.spares = spares
        self._preload: tuple[Path, str] | None = None
        self._local = threading.local()  # deferred_spare() holds for the thread inside it only
        # Deferring costs back-to-back evaluations the spare's start-up; only worth it where
        # that start-up would steal the candidate's cores.
        self.defer_spares = (os.cpu_count() or 1) <= SMALL_MACHINE_CORES
        self._spares: deque[Worker] = deque()
        self._closed = False
        self._lock = threading.RLock()
        # Workers forked from one process that imported torch once: ~3 s of CPU less per worker.
        use_server = forkable(self.limits) and os.environ.get(FORK_SERVER_ENV, "1") != "0"
        self._server = ForkServer(fork_server_env()) if use_server else None
        self.replenish()

    @property
    def waiting(self) -> tuple[Worker, ...]:
        """The spares, oldest first (started or ready; not yet handed out)."""
        return tuple(self._spares)

    def _start(self) -> Worker:
        if self._preload is not None:
            path, device = self._preload
            return Worker(self.limits, self.cuda, device, path, self._server)
        return Worker(self.limits, self.cuda, self.device, server=self._server)

    def prefetch(self, inputs: Path, device: str) -> None:
        """Spares started from now on load ``inputs`` onto ``device`` before their job arrives
        (a workload inputs file, or a session's prefix keys: what the next candidates will most likely be given)."""
        self._preload = (inputs, device)

    def wait_ready(self, timeout: float, every: bool = False) -> bool:
        """Block until the oldest spare (``every``: each spare) has finished starting, at most
        ``timeout`` seconds in all (benchmarks time the warm path with it)."""
        self.replenish()
        deadline = time.monotonic() + timeout
        waited = self._spares if every else list(self._spares)[:1]
        return all(w.wait_ready(max(0.0, deadline - time.monotonic())) for w in waited)

    def _drop_dead(self) -> None:
        """Release spares that died while waiting (OOM killer, a stray signal): never hand one out."""
        for worker in [w for w in self._spares if not w.alive()]:
            self._spares.remove(worker)
            worker.release()

    def replenish(self) -> None:
        """Start spares until ``spares`` are starting or warm (after a deferred ``take``, or deaths),
        and have every ready spare that started before ``prefetch`` load the inputs it names."""
        with self._lock:
            self._drop_dead()
            while len(self._spares) < self.spares and not self._closed:
                self._spares.append(self._start())
            if self._preload is not None:
                # Without this, spares started before the pool knew the workload (all of them at
                # first) each load it on their candidate's clock: ~0.1-0.3 s per evaluation.
                path, device = self._preload
                for worker in self._spares:
                    if worker.preloaded is None and worker.device == device and _ready_now(worker):
                        worker.preload_late(path)

    @contextlib.contextmanager
    def deferred_spare(self, always: bool = False) -> Iterator[None]:
        """``take`` calls inside this block leave starting the replacements to ``replenish``
        (on small machines only, see ``defer_spares``, unless ``always``)."""
        self._local.defer = always or self.defer_spares
        try:
            yield
        finally:
            self._local.defer = False

    def take(self) -> Worker:
        """A fresh worker for one candidate: a spare (ready ones first) or, if none is alive, a new one."""
        with self._lock:
            self._drop_dead()
            worker = next((w for w in self._spares if _ready_now(w)), self._spares[0] if self._spares else None)
            if worker is not None:
                self._spares.remove(worker)
            if not getattr(self._local, "defer", False):
                self.replenish()
            return worker if worker is not None else self._start()

    def close(self) -> None:
        """Release every spare (kill its process tree, free its scratch)."""
        with self._lock:
            self._closed = True  # a session closing after its pool starts no spare nobody would release
            while self._spares:
                self._spares.popleft().release()
            if self._server is not None:
                self._server.close()
                self._server = None

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _ready_now(worker: Worker) -> bool:
    """Whether ``worker`` waits for its job already (never blocks). A worker whose launcher
    refused to isolate counts as ready: handed out, its ``run`` raises IsolationUnavailable."""
    try:
        return worker.wait_ready(0)
    except IsolationUnavailable:
        return True


