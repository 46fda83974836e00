"""The trusted side of the sandbox: start workers, hand them a job, kill them, score the result."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from evaluator.sandbox.isolation import NOBODY, is_root, kill_tree, scrubbed_env
from evaluator.sandbox.limits import SandboxLimits
from evaluator.sandbox.scratch import OverCap, ScratchView
from evaluator.sandbox.channel import ChannelError, ChannelOverflow, DeadlineIO
from evaluator.sandbox.result_stream import ResultStream, SelectionHook
from evaluator.sandbox.transport import workload_inputs
from evaluator.errors import IsolationUnavailable
from evaluator.threads import evaluation_threads
from evaluator.scoring import ScoreReport

_REPO_ROOT = str(Path(__file__).resolve().parents[2])
_LAUNCHER = str(Path(__file__).resolve().with_name("launcher.py"))
_READ_CHUNK = 64 * 1024
_MAX_STATUS = 4 * 1024 * 1024
_RESULT_PIPE_BYTES = 8 << 20


class _CappedReader(threading.Thread):
    """Drains a pipe in chunks, keeping at most ``cap`` bytes; sets ``exceeded`` past it."""

    def __init__(self, stream: Any, cap: int) -> None:
        super().__init__(daemon=True)
        self.stream, self.cap = stream, cap
        self.buf = bytearray()
        self.exceeded = threading.Event()

    def run(self) -> None:
        try:
            while chunk := self.stream.read1(_READ_CHUNK):
                room = self.cap - len(self.buf)
                if room > 0:
                    self.buf += chunk[:room]
                if len(chunk) > room:
                    self.exceeded.set()  # keep draining (discarding) so the child never blocks
        except (OSError, ValueError):
            pass

    def text(self) -> str:
        return self.buf.decode("utf-8", "replace")


@dataclass
class WorkerOutcome:
    """How a worker ended; ``status`` is its own (untrusted) account, if it wrote one."""

    returncode: int | None
    timed_out: bool
    log_exceeded: bool
    log: str
    status: dict[str, Any] | None
    elapsed_s: float
    job_sent: bool = True  # False: the worker died or hung before taking the job (our fault)
    channel_error: str | None = None  # the result stream was malformed (the worker's fault)


UNSAFE_ENV = "ADRS_UNSAFE_ALLOW_UNISOLATED"  # "1": run candidates without namespaces (loudly reported)


def _python_paths() -> list[str]:
    """The Python installation and its package directories, as the worker must see them.

    Paths that would expose far more than Python (``/``, or an ancestor of this repository,
    whose ``runs/`` holds run directories) are left out.
    """
    import site

    found = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *site.getsitepackages()}
    found |= {p for p in sys.path if p and ("site-packages" in p or "dist-packages" in p)}
    return sorted(p for p in found | set(_extra_pythonpath()) if _exposable(p))


def _exposable(path: str) -> bool:
    """A directory that may be bound into the sandbox: not ``/``, not this repository or above it."""
    repo = _REPO_ROOT.rstrip("/") + "/"
    return (os.path.isabs(path) and os.path.isdir(path) and path != "/" and path.rstrip("/") != _REPO_ROOT
            and not repo.startswith(path.rstrip("/") + "/"))


def _extra_pythonpath() -> list[str]:
    """The caller's own PYTHONPATH entries (packages installed with --target, say), where exposable."""
    return [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and _exposable(p)]


def launch_spec(limits: SandboxLimits, cuda: bool, control_fd: int, lifeline_fd: int,
                plain_pythonpath: str, prep: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the launcher (``evaluator.sandbox.launcher``) sets up for one worker.

    ``plain_pythonpath``: the worker's PYTHONPATH under the no-isolation opt-out; inside the
    namespaces it is ``pythonpath`` (the bound ``evaluator`` and the caller's package dirs).
    ``prep``: what the worker may do before its job (``{"device": ..., "preload": bool}``).
    """
    return {
        "python": sys.executable,
        "argv": [sys.executable, "-s", "-m", "evaluator.sandbox.worker", str(control_fd), limits.to_json(),
                 json.dumps(prep or {})],
        "control_fd": control_fd, "lifeline_fd": lifeline_fd, "cuda": cuda,
        "python_paths": _python_paths(),
        "lib_binds": [[os.path.join(_REPO_ROOT, "evaluator"), "/sandbox/lib/evaluator"]],
        "plain_pythonpath": plain_pythonpath,
        "pythonpath": os.pathsep.join(["/sandbox/lib", *_extra_pythonpath()]),
        # One tmpfs holds the candidate's scratch and the selections the worker writes back.
        "scratch_bytes": limits.scratch_bytes + limits.output_bytes + (4 << 20),
        "owner": [NOBODY, NOBODY] if is_root() else None,
        "isolate": limits.isolate,
        "allow_unisolated": limits.unsafe_allow_unisolated or os.environ.get(UNSAFE_ENV) == "1",
    }


class Worker:
    """One sandbox process: started (imports torch), then used for exactly one candidate.

    Started through the launcher, which isolates it (``evaluator.sandbox.launcher``) and
    sends a hello (what isolation is in force, and an fd of the private scratch) over the
    control socket; the worker then says "R" on the same socket once torch is imported.
    """

    def __init__(self, limits: SandboxLimits, cuda: bool = False, device: str | None = None,
                 preload: Path | None = None) -> None:
        """``device``: the slot's device, set before the worker's warm-up; ``preload``: a workload
        inputs file the worker loads onto ``device`` before it says ready (``preloaded`` names it)."""
        self.limits = limits
        self.marker = uuid.uuid4().hex
        self.cuda = cuda
        self.preloaded = preload if preload is not None and device is not None else None
        env = scrubbed_env(os.environ, self.marker, _REPO_ROOT)  # the launcher sets PYTHONPATH per level
        if cuda:
            env["ADRS_SANDBOX_CUDA"] = "1"
        self.control, child_control = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # The lifeline's write end stays here only: if this process dies, the launcher kills the worker.
        lifeline_r, self._lifeline = os.pipe()
        prep = ({"device": device, "preload": self.preloaded is not None,
                 "rehearse": os.environ.get("ADRS_SPARE_REHEARSAL", "1") != "0"} if device is not None else None)
        spec = launch_spec(limits, cuda, child_control.fileno(), lifeline_r, env["PYTHONPATH"], prep)
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", _LAUNCHER, json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=env, cwd="/", start_new_session=True, pass_fds=(child_control.fileno(), lifeline_r), close_fds=True,
        )
        child_control.close()
        os.close(lifeline_r)
        self.pgid = self.proc.pid  # start_new_session: the launcher leads its own group
        self._reader = _CappedReader(self.proc.stdout, limits.log_bytes)
        self._reader.start()
        self.scratch: ScratchView | None = None
        self.isolation: str | None = None  # what the launcher set up, in words
        self._ready: bool | None = None  # None: not known yet
        self._refused: str | None = None  # why the launcher refused to isolate, once it said so
        if self.preloaded is not None:
            # Queued on the control socket: the worker reads it once torch is imported.
            fd = os.open(self.preloaded, os.O_RDONLY | os.O_CLOEXEC)
            try:
                socket.send_fds(self.control, [b"preload"], [fd])
            except OSError:
                self.preloaded = None  # the worker is already gone: wait_ready will say so
            finally:
                os.close(fd)

    def _receive(self, deadline: float) -> tuple[bytes, list[int]] | None:
        """One message from the control socket before ``deadline``, or None."""
        ready, _, _ = select.select([self.control], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return None
        try:
            data, fds, _, _ = socket.recv_fds(self.control, 64 * 1024, 4)
        except OSError:
            return None
        if not data:
            for fd in fds:
                os.close(fd)
            return None
        return data, fds

    def wait_ready(self, timeout: float) -> bool:
        """True once the worker is isolated, has imported everything and waits for its job.

        Raises IsolationUnavailable when the launcher could set up no isolation (and no opt-out
        was given): no worker ran, and none will on this machine. A False before ``timeout``'s end
        is not final: a later call picks up where this one stopped (``WorkerPool`` polls spares
        with ``timeout=0``); a dead worker answers False at once, every time.
        """
        if self._refused is not None:
            raise IsolationUnavailable(self._refused)
        if self._ready is not None:
            return self._ready
        deadline = time.monotonic() + timeout
        if self.isolation is None:
            hello = self._receive(deadline)
            if hello is None:
                return False
            data, fds = hello
            try:
                info = json.loads(data)
                level, detail = info["level"], str(info["detail"])
            except (ValueError, KeyError, TypeError):
                level, detail = "refused", "malformed hello from the launcher"
            if level == "refused" or not fds:
                for fd in fds:
                    os.close(fd)
                self._refused = detail
                raise IsolationUnavailable(detail)
            self.scratch = ScratchView(fds[0], info.get("scratch") if level == "none" else None)
            for fd in fds[1:]:
                os.close(fd)
            self.isolation = detail
        ready = self._receive(deadline)
        if ready is None:
            return False
        self._ready = ready[0] == b"R"
        return self._ready

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send_job(self, job: dict[str, Any], fds: dict[str, int]) -> None:
        """Hand over the job: the files it needs as fds (the worker cannot open our paths), then the JSON."""
        names = sorted(fds)
        socket.send_fds(self.control, [json.dumps(names).encode()], [fds[n] for n in names])
        self.proc.stdin.write((json.dumps(job) + "\n").encode())
        self.proc.stdin.close()

    def run(self, job: dict[str, Any], fds: dict[str, int],
            on_result: Callable[[dict[str, Any], dict[str, torch.Tensor], int], bool]) -> WorkerOutcome:
        """Hand over the job and read the worker's result stream until its status, ``wall_s``,
        its death or a malformed message; then SIGKILL its tree (reaped by ``close``).

        ``on_result(header, tensors, size)`` gets every message before the status, as it comes
        (the caller scores while the worker computes); it returns False to stop reading.
        """
        t0 = time.monotonic()
        timed_out = False
        job_sent = False
        status = None
        channel_error = None
        res_r, res_w = os.pipe()
        _widen_pipe(res_w)
        deadline = t0 + self.limits.wall_s

        def pulse() -> None:  # also while bytes flow: a trickle must not outrun the limits
            if self._reader.exceeded.is_set():
                raise _StreamEnded()
            if time.monotonic() > deadline:
                raise _StreamEnded(timed_out=True)

        def check() -> None:  # nothing to read: also notice the worker's death
            pulse()
            if not self.alive():
                raise _StreamEnded()

        try:
            try:
                if not self.wait_ready(self.limits.startup_s):
                    raise _StartupFailed()
                self.send_job(job, {**fds, "results": res_w})
            finally:
                os.close(res_w)  # the worker holds its own copy: its death reads as end of file here
            job_sent = True
            t0 = time.monotonic()
            deadline = t0 + self.limits.wall_s
            io = DeadlineIO(res_r, None, check, self.limits.output_bytes, pulse)
            while True:
                header, tensors = io.receive()
                if "status" in header:
                    status = header["status"] if isinstance(header["status"], dict) else None
                    break
                size = sum(t.numel() * t.element_size() for t in tensors.values())
                if not on_result(header, tensors, size):
                    break
        except _StreamEnded as end:
            timed_out = end.timed_out
        except ChannelOverflow as exc:
            channel_error = f"overflow: {exc}"
        except ChannelError as exc:
            channel_error = str(exc)
        except (_StartupFailed, BrokenPipeError, OSError):
            pass  # the worker died or hung before taking the job: a harness failure
        finally:
            os.close(res_r)
            # Everything we score is in our memory now: kill at once, reap in close() while we score.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pgid, signal.SIGKILL)
        return WorkerOutcome(self.proc.poll(), timed_out, self._reader.exceeded.is_set(), "", status,
                             time.monotonic() - t0, job_sent, channel_error)

    def settle(self, outcome: WorkerOutcome) -> WorkerOutcome:
        """``close`` the worker and complete ``outcome`` with its exit code and full log."""
        self.close()
        outcome.returncode = self.proc.returncode
        outcome.log_exceeded = outcome.log_exceeded or self._reader.exceeded.is_set()
        outcome.log = self._reader.text()
        return outcome

    def read_status(self) -> dict[str, Any] | None:
        """The worker's own (untrusted) status.json, if it wrote a well-formed one."""
        if self.scratch is None:
            return None
        try:
            return _parse_status(self.scratch.read("status.json", _MAX_STATUS))
        except OverCap:
            return None

    def close(self) -> None:
        """Kill the worker and every descendant (even those that left the group), reap it.

        The scratch stays readable until ``release``.
        """
        kill_tree(self.pgid, self.marker)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._reader.join(timeout=2)
        if self._lifeline >= 0:
            os.close(self._lifeline)
            self._lifeline = -1
        self.control.close()

    def release(self) -> None:
        """``close`` and free the scratch (its tmpfs, or the host directory of the opt-out)."""
        self.close()
        if self.scratch is not None:
            self.scratch.close()


def _widen_pipe(fd: int) -> None:
    """Give the result pipe room for several records' messages (64 KiB by default; a record of
    ``default`` is ~330 KB), so the worker computes the next record while we score this one
    instead of waiting for us to drain it. Root may go above ``/proc/sys/fs/pipe-max-size``; an
    ordinary user gets at most that. The size only changes how far the two sides overlap, so
    a kernel that refuses both keeps the default."""
    for size in (_RESULT_PIPE_BYTES, 1 << 20):
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
            return
        except OSError:
            continue


class _StartupFailed(Exception):
    pass


class _StreamEnded(Exception):
    """The worker stopped answering: it died, printed too much, or ran out of time."""

    def __init__(self, timed_out: bool = False) -> None:
        super().__init__("timed out" if timed_out else "ended")
        self.timed_out = timed_out


def _parse_status(data: bytes | None) -> dict[str, Any] | None:
    if data is None:
        return None
    try:
        status = json.loads(data)
    except ValueError:
        return None
    return status if isinstance(status, dict) else None


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
        self._defer = False
        # Deferring costs back-to-back evaluations the spare's start-up; only worth it where
        # that start-up would steal the candidate's cores.
        self.defer_spares = (os.cpu_count() or 1) <= SMALL_MACHINE_CORES
        self._spares: deque[Worker] = deque()
        self.replenish()

    @property
    def waiting(self) -> tuple[Worker, ...]:
        """The spares, oldest first (started or ready; not yet handed out)."""
        return tuple(self._spares)

    def _start(self) -> Worker:
        if self._preload is not None:
            path, device = self._preload
            return Worker(self.limits, self.cuda, device, path)
        return Worker(self.limits, self.cuda, self.device)

    def prefetch(self, inputs: Path, device: str) -> None:
        """Spares started from now on load ``inputs`` onto ``device`` before their job arrives
        (a workload inputs file: what the next candidates will most likely be given)."""
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
        """Start spares until ``spares`` are starting or warm (after a deferred ``take``, or deaths)."""
        self._drop_dead()
        while len(self._spares) < self.spares:
            self._spares.append(self._start())

    @contextlib.contextmanager
    def deferred_spare(self) -> Iterator[None]:
        """``take`` calls inside this block leave starting the replacements to ``replenish``
        (on small machines only: see ``defer_spares``)."""
        self._defer = self.defer_spares
        try:
            yield
        finally:
            self._defer = False

    def take(self) -> Worker:
        """A fresh worker for one candidate: a spare (ready ones first) or, if none is alive, a new one."""
        self._drop_dead()
        worker = next((w for w in self._spares if _ready_now(w)), self._spares[0] if self._spares else None)
        if worker is not None:
            self._spares.remove(worker)
        if not self._defer:
            self.replenish()
        return worker if worker is not None else self._start()

    def close(self) -> None:
        """Release every spare (kill its process tree, free its scratch)."""
        while self._spares:
            self._spares.popleft().release()

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


@dataclass
class SandboxRun:
    """A report plus how the worker ended; tests and benchmarks look behind the report."""

    report: ScoreReport
    outcome: WorkerOutcome | None = None
    pgid: int | None = None
    marker: str | None = None


def evaluate_in_sandbox(
    candidate_path: str | Path, workload: Any, density_target: float = 0.10, base_seed: int | None = None,
    limits: SandboxLimits | None = None, pool: WorkerPool | None = None, *, on_selection: SelectionHook | None = None,
) -> ScoreReport:
    """Score an untrusted candidate file on ``workload`` in a fresh, isolated worker.

    Every way the candidate can fail comes back as a ScoreReport with a failure category;
    the numbers of a valid result are computed here, by the trusted scorer, and equal
    ``evaluator.inprocess.score_file`` exactly. ``on_selection`` (trusted code) receives each
    record's weights once they have been validated, in record order.
    """
    return run_candidate(candidate_path, workload, density_target, base_seed, limits, pool,
                         on_selection=on_selection).report


def run_candidate(
    candidate_path: str | Path, workload: Any, density_target: float = 0.10, base_seed: int | None = None,
    limits: SandboxLimits | None = None, pool: WorkerPool | None = None, *, on_selection: SelectionHook | None = None,
) -> SandboxRun:
    """``evaluate_in_sandbox`` that also returns the worker's outcome, process group and marker."""
    t_start = time.perf_counter()
    limits = pool.limits if pool is not None else (limits or SandboxLimits())
    base_seed = workload.spec.seed if base_seed is None else base_seed
    label = workload.label
    candidate_path = Path(candidate_path)
    try:
        source = candidate_path.read_text()
        compile(source, str(candidate_path), "exec")  # compiling runs nothing: safe here
    except SyntaxError as exc:
        return SandboxRun(_done(ScoreReport.failure("syntax", f"line {exc.lineno}: {exc.msg}", details=_syntax_context(exc)),
                                label, t_start))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return SandboxRun(_done(ScoreReport.failure("import", f"cannot read candidate: {exc}"), label, t_start))

    device = workload.records[0].queries.device
    if pool is not None and pool.cuda != (device.type == "cuda"):
        raise ValueError(f"WorkerPool(cuda={pool.cuda}) cannot serve a workload on {device}")
    inputs = workload_inputs(workload)
    job = {"candidate_name": candidate_path.name, "source": source, "device": str(device),
           "density_target": density_target, "base_seed": base_seed, "num_threads": evaluation_threads(device)}
    if pool is None:
        worker = Worker(limits, cuda=device.type == "cuda")
    else:
        pool.prefetch(inputs, str(device))
        with pool.deferred_spare():  # subclasses may override take(): still call it
            worker = pool.take()
    fds: dict[str, int] = {}
    if getattr(worker, "preloaded", None) == inputs:
        job["preloaded"] = True  # the warm worker holds these inputs on the device already
    else:
        fds["inputs"] = os.open(inputs, os.O_RDONLY | os.O_CLOEXEC)
    stream = ResultStream(workload, density_target, limits, on_selection)
    try:
        outcome = worker.run(job, fds, stream.take)  # IsolationUnavailable passes through
        stream.finish(outcome.status)  # the last chunk is scored while the killed worker is torn down
        report = _interpret(worker.settle(outcome), limits, stream.report)
        report.isolation = worker.isolation
    finally:
        for fd in fds.values():
            os.close(fd)
        worker.release()
        if pool is not None:
            # Candidate killed and scored: the replacement's start-up now overlaps what the
            # caller does next (the next proposal), not the candidate's run or our scoring,
            # which it slowed 3-6x on 2 cores.
            pool.replenish()
    return SandboxRun(_done(report, label, t_start), outcome, worker.pgid, worker.marker)


def _done(report: ScoreReport, label: str, t_start: float) -> ScoreReport:
    report.workload = label
    report.wall_s = time.perf_counter() - t_start
    return report


def _syntax_context(exc: SyntaxError) -> str | None:
    if not exc.text:
        return None
    caret = " " * max(0, (exc.offset or 1) - 1) + "^"
    return f"{exc.text.rstrip()}\n{caret}"


def _log_tail(log: str, limit: int = 4000) -> str | None:
    log = log.strip()
    if not log:
        return None
    return log if len(log) <= limit else "...[trimmed]...\n" + log[-limit:]


def _interpret(outcome: WorkerOutcome, limits: SandboxLimits,
               score: Callable[[dict[str, Any]], ScoreReport] | None = None) -> ScoreReport:
    """Turn how the worker ended into a report; only trusted code computes scores.

    ``score(status)`` makes the report of a worker that says it succeeded (sessions have none:
    their worker only ends early on a failure)."""
    log = _log_tail(outcome.log)
    if not outcome.job_sent:
        return ScoreReport.failure("harness", "the sandbox worker failed to start (no candidate code ran)", details=log)
    if outcome.timed_out:
        return ScoreReport.failure("timeout", f"the candidate ran longer than {limits.wall_s:g} s and was killed", details=log)
    if outcome.log_exceeded:
        return ScoreReport.failure("output", f"the candidate printed more than {limits.log_bytes} bytes; do not print in a masker",
                                   details=_log_tail(outcome.log, 1000))
    if outcome.channel_error is not None:
        if outcome.channel_error.startswith("overflow: "):
            return ScoreReport.failure("output", f"selections exceed {limits.output_bytes} bytes", details=log)
        return ScoreReport.failure("crash", f"the candidate process wrote a malformed result: {outcome.channel_error}"[:1000],
                                   details=log)
    status = outcome.status
    rc = outcome.returncode
    if rc is not None and rc < 0 and status is None:  # after a status, the SIGKILL is ours
        sig = signal.Signals(-rc).name if -rc in signal.valid_signals() else str(-rc)
        if sig == "SIGXFSZ":
            return ScoreReport.failure("output", "the candidate wrote a file larger than the output limit", details=log)
        hint = " (likely the kernel's out-of-memory killer)" if sig == "SIGKILL" else ""
        return ScoreReport.failure("crash", f"the candidate process was killed by {sig}{hint}", details=log)
    if status is None:
        return ScoreReport.failure(
            "crash", f"the candidate process exited with code {rc} before reporting a result "
            "(os._exit, sys.exit at import, or a crash)", details=log)
    if not status.get("ok"):
        category = status.get("category")
        if category not in ("import", "exception", "memory", "output"):
            return ScoreReport.failure("crash", "the candidate process reported an unknown failure", details=log)
        reason = str(status.get("reason", ""))[:2000]
        details = status.get("details")
        details = str(details)[:8000] if details else log
        return ScoreReport.failure(category, reason, details=details)
    if score is None:
        return ScoreReport.failure("crash", "the candidate process reported success out of turn", details=log)
    return score(status)
