"""Local slots whose harness runs in a process of its own, one per GPU.

A thread slot (``LocalSlot``) decodes, checks and scores each candidate's selections in the
driver: with two GPUs, two such threads share one interpreter lock and one CUDA launch path,
and each evaluation got slower (0.18 -> 0.29 s on 2 x H200). A ``ProcessSlot`` starts a
trusted harness process (a fresh interpreter: no CUDA state inherited) that loads
the run's workloads from their specs onto its GPU, keeps its own warm sandbox pool and
answers one ``(code, which)`` at a time with a ``ScoreReport``; the driver only queues.

The candidate still runs in that process's sandbox workers, exactly as on the other
backends. The slot process is harness code, so the pipe to it carries pickles. It dies with
the driver's serving thread (``PR_SET_PDEATHSIG``), and its sandbox workers die with it. A slot
process that dies, or answers nothing within the candidate's limits plus a margin, is
killed and replaced; its job is retried like any lost worker's.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

from adrs.scheduler.base import Slot, Which, WorkerLost
from adrs.scheduler.host import GUARD_MARGIN_S, SlotHost, lost_if_unstarted
from evaluator.sandbox import SandboxLimits, WorkerPool
from evaluator.scoring import ScoreReport
from evaluator.speedup import SpeedupOptions
from evaluator.workload import WorkloadSpec

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class SlotProcessError(RuntimeError):
    """An exception in the slot process that could not travel back as itself."""


def _die_with_parent(parent_pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent_pid:  # the parent was gone before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _portable(exc: Exception) -> Exception:
    """``exc`` itself if it survives a pickle round trip, else its type, text and traceback as one error."""
    import pickle
    import traceback

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any exception that cannot be pickled is sent as text instead
        text = "".join(traceback.format_exception(exc))
        return SlotProcessError(f"{type(exc).__name__}: {exc}\n{text}")


def serve(fd: int) -> None:
    """The slot process, on its end of the pipe: the first message is its set-up; then it answers
    ``(method, *args)`` with ``("ok", result)`` or ``("error", exception)`` until ``None`` or the
    driver's end closes."""
    conn = Connection(fd)
    parent_pid, specs, density_target, limits, device, speedup, spares = conn.recv()
    _die_with_parent(parent_pid)
    pool = WorkerPool(limits, cuda=device.startswith("cuda"), device=device, spares=spares)
    host = SlotHost(specs, density_target, pool, speedup)
    try:
        conn.send(("ok", os.getpid()))
        while True:
            try:
                request = conn.recv()
            except EOFError:
                return
            if request is None:
                return
            method, *args = request
            try:
                answer: tuple[str, Any] = ("ok", getattr(host, method)(*args))
            except Exception as exc:  # noqa: BLE001 - a harness error belongs to the caller, in the driver
                answer = ("error", _portable(exc))
            conn.send(answer)
    finally:
        host.close()


class ProcessSlot(Slot):
    """One GPU (or CPU) slot served by a harness process of its own."""

    def __init__(self, index: int, device: str, specs: dict[str, WorkloadSpec | None], density_target: float,
                 limits: SandboxLimits, speedup: SpeedupOptions | None = None, spares: int = 1,
                 start_timeout_s: float = 300.0, load_timeout_s: float = 3600.0,
                 guard_margin_s: float = GUARD_MARGIN_S) -> None:
        """``guard_margin_s``: how long past the candidate's own limits the slot process may stay silent."""
        self.name = f"process-{index}-{device}"
        self.device = device
        self.spares = spares
        self._args = (specs, density_target, limits, device, speedup, spares)
        self._guard_s = limits.startup_s + limits.wall_s + guard_margin_s
        self._start_timeout_s = start_timeout_s
        self._load_timeout_s = load_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._loaded: set[str] = set()
        self.pid: int | None = None

    def open(self) -> None:
        # A fresh interpreter: a forked copy of the driver would inherit its CUDA state and its threads'
        # locks, and multiprocessing's spawn would re-run the driver's own script.
        ours, theirs = multiprocessing.Pipe()
        self._process = subprocess.Popen(
            [sys.executable, "-c", f"from adrs.scheduler.process import serve; serve({theirs.fileno()})"],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        self._conn = ours
        ours.send((os.getpid(), *self._args))
        self._loaded.clear()
        self.pid = self._ask(None, self._start_timeout_s, "start")

    def evaluate(self, code: str, which: Which) -> ScoreReport:
        if which not in self._loaded:
            self._ask(("load", which), self._load_timeout_s, f"load the {which} workload")
            self._loaded.add(which)
        return lost_if_unstarted(self._ask(("evaluate", code, which), self._guard_s, "evaluate"))

    def recover(self) -> bool:
        """Replace the slot process; False when a new one cannot start."""
        self._stop(grace_s=0)
        try:
            self.open()
            return True
        except (WorkerLost, OSError) as exc:
            log.warning("cannot restart the harness process of %s: %s", self.name, exc)
            self._stop(grace_s=0)
            return False

    def close(self) -> None:
        self._stop(grace_s=30)

    def _ask(self, request: tuple[Any, ...] | None, timeout_s: float, what: str) -> Any:
        """Send ``request`` (None: just wait for the start-up answer) and wait for its answer; a harness
        error in the slot process is raised here, a dead or silent process becomes ``WorkerLost``."""
        assert self._conn is not None and self._process is not None
        answer = None
        try:
            if request is not None:
                self._conn.send(request)
            deadline = time.monotonic() + timeout_s
            while answer is None and self._process.poll() is None and time.monotonic() < deadline:
                if self._conn.poll(min(1.0, max(0.0, deadline - time.monotonic()))):
                    answer = self._conn.recv()
            if answer is None and self._conn.poll(0):  # answered, then exited
                answer = self._conn.recv()
        except (EOFError, OSError) as exc:  # the pipe broke: the process is gone
            self._stop(grace_s=0)
            raise WorkerLost(f"harness process {self.pid} of {self.name} failed to {what}: {exc}") from None
        if answer is None:
            code = self._process.poll()
            why = f"exited with {code}" if code is not None else f"gave no answer in {timeout_s:g} s"
            self._stop(grace_s=0)
            raise WorkerLost(f"harness process {self.pid} of {self.name} {why} while asked to {what}")
        status, value = answer
        if status == "error":
            raise value
        return value

    def _stop(self, grace_s: float) -> None:
        """Ask the slot process to close its pool and exit; kill it after ``grace_s``."""
        process, conn, self._process, self._conn = self._process, self._conn, None, None
        if process is None:
            return
        if conn is not None:
            if grace_s > 0 and process.poll() is None:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # it died meanwhile: nothing to ask
                    conn.send(None)
            conn.close()
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()  # its sandbox workers die with it (their launcher watches it)
            process.wait(10)
