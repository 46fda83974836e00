"""The scheduler interface and the slot machinery both backends share.

A scheduler owns *slots*: one place where one sandboxed evaluation runs at a time (a GPU, a
CPU worker, a Ray actor). Each slot is served by its own thread that pulls jobs from one
shared queue, so a free slot always takes the next candidate and a slow one never holds
others back. Checks (the numerics audit, held-out scores) go ahead of queued search jobs: a
commit waits on them, and the loop launches nothing past its window until that commit lands. A slot that loses its worker mid-evaluation raises ``WorkerLost``; the job goes
back on the queue for any slot (the same one once it has recovered, or another) until
``max_attempts`` is spent, and then comes back as a ``worker_lost`` failure. No job ends
without its future being resolved.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
from abc import ABC, abstractmethod
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

from evaluator.scoring import ScoreReport

# audit: the search workload scored in float64 (the numerics audit).
Which = Literal["search", "heldout", "audit"]
WHICH: tuple[Which, ...] = ("search", "heldout", "audit")

log = logging.getLogger(__name__)


class WorkerLost(RuntimeError):
    """The evaluation's worker, actor or node went away; the candidate itself is not to blame."""


class SchedulerClosed(RuntimeError):
    """The scheduler was closed before this candidate was evaluated."""


class Scheduler(ABC):
    """Runs sandboxed evaluations; many may be in flight, each comes back as a ScoreReport."""

    @property
    @abstractmethod
    def slots(self) -> int:
        """How many evaluations can run at the same time."""

    @abstractmethod
    def submit(self, code: str, which: Which = "search") -> "Future[ScoreReport]":
        """Queue ``code`` for scoring on the search or held-out workload."""

    @abstractmethod
    def close(self) -> None:
        """Stop every worker; jobs still queued fail with SchedulerClosed."""

    def score(self, code: str, which: Which = "search") -> ScoreReport:
        """Blocking convenience: submit and wait."""
        return self.submit(code, which).result()

    def __enter__(self) -> "Scheduler":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Slot(ABC):
    """One evaluation at a time. Every method runs in the slot's own serving thread."""

    name: str = "slot"

    @abstractmethod
    def open(self) -> None:
        """Start the worker(s) behind this slot; an exception retires the slot."""

    @abstractmethod
    def evaluate(self, code: str, which: Which) -> ScoreReport:
        """Score one candidate; raise WorkerLost when the worker behind the slot is gone."""

    def recover(self) -> bool:
        """After WorkerLost: make the slot usable again. False retires it."""
        return True

    @abstractmethod
    def close(self) -> None:
        """Release the worker(s); called once, from the serving thread."""


@dataclass
class Job:
    """A candidate waiting for a slot, and what happened to it so far."""

    code: str
    which: Which
    future: "Future[ScoreReport]" = field(default_factory=Future)
    losses: list[str] = field(default_factory=list)


class SlotScheduler(Scheduler):
    """A shared queue served by one thread per slot, with bounded retries of lost work."""

    def __init__(self, slots: Sequence[Slot], max_attempts: int = 3) -> None:
        if not slots:
            raise ValueError("a scheduler needs at least one slot")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        # (rank, arrival, job): checks before search jobs, each kind first come first served; None stops a slot.
        self._queue: "queue.PriorityQueue[tuple[int, int, Job | None]]" = queue.PriorityQueue()
        self._arrivals = itertools.count()
        self._max_attempts = max_attempts
        # Re-entrant: resolving a future runs its callbacks here, and one may submit again.
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._opened = 0
        self._closed = False
        self._alive = len(slots)
        self._slots = list(slots)
        self._threads = [threading.Thread(target=self._serve, args=(s,), name=f"adrs-{s.name}", daemon=True)
                         for s in self._slots]
        for t in self._threads:
            t.start()

    @property
    def slots(self) -> int:
        return len(self._slots)

    def wait_started(self, timeout: float | None = None) -> bool:
        """Block until one slot has started (True) or every slot failed to (False)."""
        with self._changed:
            self._changed.wait_for(lambda: self._opened > 0 or self._alive == 0, timeout)
            return self._opened > 0

    def submit(self, code: str, which: Which = "search") -> "Future[ScoreReport]":
        if which not in WHICH:
            raise ValueError(f"which must be one of {WHICH}, got {which!r}")
        job = Job(code, which)
        with self._lock:
            if self._closed:
                raise SchedulerClosed("the scheduler is closed")
            if self._alive == 0:
                _resolve(job.future, _lost(job, "no evaluation worker is left"))
                return job.future
            self._put(job)
        return job.future

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._drain(_closed)
            for _ in self._threads:
                self._put(None)
        for t in self._threads:
            t.join()
        self._drain(_closed)  # requeued by a slot while it was stopping

    def _serve(self, slot: Slot) -> None:
        try:
            slot.open()
        except Exception:  # noqa: BLE001 - a slot that cannot start must not take the others down
            log.exception("evaluation slot %s failed to start; retiring it", slot.name)
            self._retire(slot)
            return
        with self._changed:
            self._opened += 1
            self._changed.notify_all()
        try:
            while (job := self._queue.get()[2]) is not None:
                if not self._run(slot, job):
                    break
        finally:
            slot.close()

    def _run(self, slot: Slot, job: Job) -> bool:
        """Evaluate one job on ``slot``; False when the slot is retired."""
        # The future stays pending while it runs: a lost job goes back on the queue with it.
        if job.future.cancelled():
            return True
        try:
            report = slot.evaluate(job.code, job.which)
        except WorkerLost as exc:
            job.losses.append(f"{slot.name}: {exc}")
            log.warning("evaluation worker lost on %s (attempt %d of %d): %s",
                        slot.name, len(job.losses), self._max_attempts, exc)
            if len(job.losses) >= self._max_attempts:
                _resolve(job.future, _lost(job, f"gave up after {len(job.losses)} attempts"))
            else:
                self._requeue(job)
            if slot.recover():
                return True
            log.warning("evaluation slot %s did not recover; retiring it", slot.name)
            self._retire(slot)
            return False
        except BaseException as exc:  # noqa: BLE001 - a harness error belongs to the caller, not to this thread
            _resolve(job.future, exc)
            if not isinstance(exc, Exception):
                raise
            return True
        _resolve(job.future, report)
        return True

    def _put(self, job: Job | None) -> None:
        rank = 2 if job is None else 1 if job.which == "search" else 0
        self._queue.put((rank, next(self._arrivals), job))

    def _requeue(self, job: Job) -> None:
        with self._lock:
            if self._closed:
                _closed(job)
            elif self._alive > 0:
                self._put(job)
            else:
                _resolve(job.future, _lost(job, "no evaluation worker is left"))

    def _retire(self, slot: Slot) -> None:
        with self._changed:
            self._alive -= 1
            last = self._alive == 0
            self._changed.notify_all()
        if last:
            # Nobody will take what is queued: resolve it rather than leave callers waiting.
            self._drain(lambda job: _resolve(job.future, _lost(job, "no evaluation worker is left")))

    def _drain(self, resolve: Callable[[Job], None]) -> None:
        while True:
            try:
                job = self._queue.get_nowait()[2]
            except queue.Empty:
                return
            if job is not None:
                resolve(job)


def _resolve(future: "Future[ScoreReport]", outcome: ScoreReport | BaseException) -> None:
    """Set a result or exception unless the caller cancelled the future meanwhile."""
    try:
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except InvalidStateError:
        if not future.cancelled():
            raise


def _closed(job: Job) -> None:
    _resolve(job.future, SchedulerClosed("the scheduler closed before this candidate was evaluated"))


def _lost(job: Job, why: str) -> ScoreReport:
    details = "\n".join(job.losses) or None
    return ScoreReport.failure("worker_lost", f"the evaluation worker was lost mid-evaluation; {why} "
                               "(not the candidate's fault)", details=details)
