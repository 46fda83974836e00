"""A local slot served by its own trusted process, so slots do not share one interpreter's lock.

With one thread per slot in the harness process, every slot's trusted side (taking a worker,
reading and decoding the result stream, scoring each record, timing the speedup) runs under
one global interpreter lock, beside the loop itself. On a GPU that side is most of an
evaluation's host time, so a second GPU added contention instead of throughput. Here each slot
is a spawned child process holding its own warm sandbox pool and its copy of the workloads
on its device: the same ``LocalSlot`` as the in-thread backend, behind a pipe.

The child is trusted harness code, like a Ray actor; the candidate still runs in the sandbox
worker the child's pool starts. Workloads travel once per kind, as shared-memory tensors
(``torch.multiprocessing``'s pickling): no copy of the records. A child that dies or answers
nothing within the candidate's limits plus a margin is killed, and the slot raises
``WorkerLost``: the scheduler retries the job and ``recover`` starts a new child. Sandbox
workers of a dead child die with their lifelines.
"""
from __future__ import annotations

import ctypes
import logging
import multiprocessing.connection
import os
import signal
import sys
import traceback
from typing import Any

import torch.multiprocessing as tmp

from adrs.scheduler.base import Slot, Which, WorkerLost
from evaluator.sandbox import SandboxLimits
from evaluator.scoring import ScoreReport
from evaluator.speedup import SpeedupOptions
from evaluator.workload import Workload

log = logging.getLogger(__name__)

# Slack on top of the sandbox's own limits before the slot gives up on its child.
GUARD_MARGIN_S = 120.0
START_TIMEOUT_S = 300.0
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """SIGKILL this process when the harness thread that started it ends (Linux; elsewhere a no-op).

    End of file on the pipe stops an idle child; this also stops one busy in an evaluation.
    """
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        os._exit(1)  # the harness died before the line above took effect


def _serve(conn: multiprocessing.connection.Connection, device: str, density_target: float, limits: SandboxLimits,
           speedup: SpeedupOptions | None, spares: int) -> None:
    """The child's main: a LocalSlot fed by the parent's messages until ``None`` or end of file."""
    from adrs.scheduler.local import LocalSlot, on_device

    _die_with_parent()
    workloads: dict[Which, Workload] = {}
    slot = LocalSlot(0, device, workloads.__getitem__, density_target, limits, speedup, spares)
    try:
        slot.open()
        conn.send(("ready", os.getpid()))
        while True:
            try:
                message = conn.recv()
            except EOFError:
                break  # the harness went away
            if message is None:
                break
            kind, payload = message
            if kind == "workload":
                which, workload = payload
                # On its GPU at once: the shared-memory copy (an fd per tensor) is then let go.
                workloads[which] = on_device(workload, device)
                slot.forget(which)  # a resent workload (after recover) replaces the device copy
                continue
            code, which = payload
            try:
                conn.send(("report", slot.evaluate(code, which)))
            except WorkerLost as exc:
                conn.send(("lost", str(exc)))
            except Exception:  # noqa: BLE001 - a harness bug: report it to the parent, which raises it
                conn.send(("error", traceback.format_exc()))
    finally:
        slot.close()


class ProcessSlot(Slot):
    """A ``LocalSlot`` run in a spawned child process; this object is its handle in the harness."""

    def __init__(self, index: int, device: str, workloads: Any, density_target: float, limits: SandboxLimits,
                 speedup: SpeedupOptions | None = None, spares: int = 1) -> None:
        self.name = f"local-{index}-{device}-proc"
        self.device = device
        self.spares = spares
        self._source = workloads
        self._args = (device, density_target, limits, speedup, spares)
        self._guard_s = limits.startup_s + limits.wall_s + GUARD_MARGIN_S
        self._process: Any = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._sent: set[Which] = set()
        self.pid: int | None = None

    def open(self) -> None:
        ctx = tmp.get_context("spawn")
        parent_end, child_end = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(child_end, *self._args), name=f"adrs-{self.name}", daemon=True)
        self._process.start()
        child_end.close()
        self._conn = parent_end
        self._sent.clear()
        kind, payload = self._receive(START_TIMEOUT_S, "start")
        if kind != "ready":
            raise RuntimeError(f"{self.name} did not start: {payload}")
        self.pid = payload

    def _receive(self, timeout: float, what: str) -> tuple[str, Any]:
        assert self._conn is not None
        try:
            if not self._conn.poll(timeout):
                self._kill()
                raise WorkerLost(f"slot process {self.pid} gave no answer to {what} in {timeout:g} s")
            return self._conn.recv()
        except (EOFError, OSError) as exc:
            self._kill()  # reaps it, so recover() sees it gone
            code = self._process.exitcode if self._process is not None else None
            raise WorkerLost(f"slot process {self.pid} died during {what} (exit code {code}): "
                             f"{type(exc).__name__}") from None

    def evaluate(self, code: str, which: Which) -> ScoreReport:
        assert self._conn is not None
        try:
            if which not in self._sent:
                self._conn.send(("workload", (which, self._source(which))))
                self._sent.add(which)
            self._conn.send(("evaluate", (code, which)))
        except (BrokenPipeError, OSError) as exc:
            self._kill()
            raise WorkerLost(f"slot process {self.pid} is gone: {exc}") from None
        kind, payload = self._receive(self._guard_s, "an evaluation")
        if kind == "report":
            return payload
        if kind == "lost":
            raise WorkerLost(payload)
        raise RuntimeError(f"{self.name}: evaluation failed in the slot process:\n{payload}")

    def recover(self) -> bool:
        """Start a new child when the old one is gone (a lost sandbox worker leaves it usable)."""
        if self._process is not None and self._process.is_alive():
            return True
        self._kill()
        try:
            self.open()
            return True
        except (WorkerLost, RuntimeError, OSError) as exc:
            log.warning("cannot restart the slot process of %s: %s", self.name, exc)
            return False

    def _kill(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.kill()
            self._process.join(10)

    def close(self) -> None:
        if self._conn is not None:
            if self._process is not None and self._process.is_alive():
                try:
                    self._conn.send(None)
                    self._process.join(60)
                except (BrokenPipeError, OSError) as exc:
                    log.debug("%s: the slot process went away while closing: %s", self.name, exc)
            self._kill()
            self._conn.close()
            self._conn = None
