"""The trusted side of the sandbox: start workers, hand them a job, kill them, score the result."""
from __future__ import annotations

import contextlib
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load

from evaluator.sandbox.isolation import NOBODY, is_root, kill_tree, scrubbed_env
from evaluator.sandbox.limits import SandboxLimits
from evaluator.sandbox.scratch import OverCap, ScratchView
from evaluator.sandbox.devicepack import decode_dense_on_device, dense_meta_ok
from evaluator.sandbox.transport import ProtocolError, decode_selection, workload_inputs
from evaluator.errors import IsolationUnavailable
from evaluator.records import AttentionRecord
from evaluator.scoring import InvalidSelection, ScoreReport, aggregate, dense_weights, record_scores

_REPO_ROOT = str(Path(__file__).resolve().parents[2])
_LAUNCHER = str(Path(__file__).resolve().with_name("launcher.py"))
_READ_CHUNK = 64 * 1024
_MAX_STATUS = 4 * 1024 * 1024

# Called by the trusted scorer with (record index, record, validated float32 weights [b, h, q, k]).
SelectionHook = Callable[[int, AttentionRecord, torch.Tensor], None]


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
                plain_pythonpath: str) -> dict[str, Any]:
    """What the launcher (``evaluator.sandbox.launcher``) sets up for one worker.

    ``plain_pythonpath``: the worker's PYTHONPATH under the no-isolation opt-out; inside the
    namespaces it is ``pythonpath`` (the bound ``evaluator`` and the caller's package dirs).
    """
    return {
        "python": sys.executable,
        "argv": [sys.executable, "-s", "-m", "evaluator.sandbox.worker", str(control_fd), limits.to_json()],
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

    def __init__(self, limits: SandboxLimits, cuda: bool = False) -> None:
        self.limits = limits
        self.marker = uuid.uuid4().hex
        self.cuda = cuda
        env = scrubbed_env(os.environ, self.marker, _REPO_ROOT)  # the launcher sets PYTHONPATH per level
        if cuda:
            env["ADRS_SANDBOX_CUDA"] = "1"
        self.control, child_control = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # The lifeline's write end stays here only: if this process dies, the launcher kills the worker.
        lifeline_r, self._lifeline = os.pipe()
        spec = launch_spec(limits, cuda, child_control.fileno(), lifeline_r, env["PYTHONPATH"])
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
        self._ready: bool | None = None

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
        was given): no worker ran, and none will on this machine.
        """
        if self._ready is not None:
            return self._ready
        deadline = time.monotonic() + timeout
        self._ready = False
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
            raise IsolationUnavailable(detail)
        self.scratch = ScratchView(fds[0], info.get("scratch") if level == "none" else None)
        for fd in fds[1:]:
            os.close(fd)
        self.isolation = detail
        ready = self._receive(deadline)
        self._ready = ready is not None and ready[0] == b"R"
        return self._ready

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send_job(self, job: dict[str, Any], fds: dict[str, int]) -> None:
        """Hand over the job: the files it needs as fds (the worker cannot open our paths), then the JSON."""
        names = sorted(fds)
        socket.send_fds(self.control, [json.dumps(names).encode()], [fds[n] for n in names])
        self.proc.stdin.write((json.dumps(job) + "\n").encode())
        self.proc.stdin.close()

    def run(self, job: dict[str, Any], fds: dict[str, int]) -> WorkerOutcome:
        """Hand over the job, wait at most ``wall_s``, kill the whole tree, collect what is left."""
        t0 = time.monotonic()
        timed_out = False
        job_sent = False
        try:
            if not self.wait_ready(self.limits.startup_s):
                raise _StartupFailed()
            self.send_job(job, fds)
            job_sent = True
            t0 = time.monotonic()
            deadline = t0 + self.limits.wall_s
            while self.proc.poll() is None:
                if self._reader.exceeded.is_set():
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                try:
                    self.proc.wait(timeout=0.05)
                except subprocess.TimeoutExpired:
                    pass
        except (_StartupFailed, BrokenPipeError, OSError):
            pass  # the worker died or hung before taking the job: a harness failure
        finally:
            self.close()
        elapsed = time.monotonic() - t0
        return WorkerOutcome(self.proc.returncode, timed_out, self._reader.exceeded.is_set(),
                             self._reader.text(), self.read_status(), elapsed, job_sent)

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


class _StartupFailed(Exception):
    pass


def _parse_status(data: bytes | None) -> dict[str, Any] | None:
    if data is None:
        return None
    try:
        status = json.loads(data)
    except ValueError:
        return None
    return status if isinstance(status, dict) else None


SMALL_MACHINE_CORES = 4  # at most this many cores: start spare workers only between candidates

class WorkerPool:
    """Keeps one warm spare worker (torch imported, no candidate run) to hide start-up time.

    Every worker still serves exactly one candidate; the pool only starts the next one early.
    ``take`` starts the replacement at once, unless inside ``deferred_spare()`` on a machine of
    at most ``SMALL_MACHINE_CORES`` cores: then it starts
    at ``replenish()`` (``run_candidate`` calls it once the candidate is scored), so the
    replacement's start-up (interpreter, torch, CUDA context: seconds of CPU) does not compete
    with the candidate's run or the scoring for cores; on 2 cores it made the worker's job 6x
    slower. ``wait_ready`` replenishes too.
    """

    def __init__(self, limits: SandboxLimits | None = None, cuda: bool = False) -> None:
        self.limits = limits or SandboxLimits()
        self.cuda = cuda
        self._defer = False
        # Deferring costs back-to-back evaluations the spare's start-up; only worth it where
        # that start-up would steal the candidate's cores.
        self.defer_spares = (os.cpu_count() or 1) <= SMALL_MACHINE_CORES
        self._spare: Worker | None = Worker(self.limits, cuda)

    def wait_ready(self, timeout: float) -> bool:
        """Block until the spare has finished starting (benchmarks time the warm path with it)."""
        self.replenish()
        return self._spare is not None and self._spare.wait_ready(timeout)

    def replenish(self) -> None:
        """Start the spare if there is none (after a deferred ``take``)."""
        if self._spare is None:
            self._spare = Worker(self.limits, self.cuda)

    @contextlib.contextmanager
    def deferred_spare(self) -> Iterator[None]:
        """``take`` calls inside this block leave starting the replacement to ``replenish``
        (on small machines only: see ``defer_spares``)."""
        self._defer = self.defer_spares
        try:
            yield
        finally:
            self._defer = False

    def take(self) -> Worker:
        spare = self._spare
        self._spare = None if self._defer else Worker(self.limits, self.cuda)
        if spare is None or not spare.alive():
            if spare is not None:
                spare.release()
            return Worker(self.limits, self.cuda)
        return spare

    def close(self) -> None:
        if self._spare is not None:
            self._spare.release()
            self._spare = None

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


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
           "density_target": density_target, "base_seed": base_seed, "num_threads": torch.get_num_threads()}
    if pool is None:
        worker = Worker(limits, cuda=device.type == "cuda")
    else:
        with pool.deferred_spare():  # subclasses may override take(): still call it
            worker = pool.take()
    inputs_fd = os.open(inputs, os.O_RDONLY | os.O_CLOEXEC)
    try:
        outcome = worker.run(job, {"inputs": inputs_fd})  # IsolationUnavailable passes through
        report = _interpret(outcome, limits, workload, density_target, worker.scratch, on_selection=on_selection)
        report.isolation = worker.isolation
    finally:
        os.close(inputs_fd)
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


def _interpret(outcome: WorkerOutcome, limits: SandboxLimits, workload: Any, density_target: float,
               scratch: ScratchView | None,
               *, on_selection: SelectionHook | None = None) -> ScoreReport:
    """Turn how the worker ended into a report; only trusted code computes scores."""
    log = _log_tail(outcome.log)
    if not outcome.job_sent:
        return ScoreReport.failure("harness", "the sandbox worker failed to start (no candidate code ran)", details=log)
    if outcome.timed_out:
        return ScoreReport.failure("timeout", f"the candidate ran longer than {limits.wall_s:g} s and was killed", details=log)
    if outcome.log_exceeded:
        return ScoreReport.failure("output", f"the candidate printed more than {limits.log_bytes} bytes; do not print in a masker",
                                   details=_log_tail(outcome.log, 1000))
    status = outcome.status
    rc = outcome.returncode
    if rc is not None and rc < 0:
        sig = signal.Signals(-rc).name if -rc in signal.valid_signals() else str(-rc)
        if sig == "SIGXFSZ":
            return ScoreReport.failure("output", "the candidate wrote a file larger than the output limit", details=log)
        if status is None or not status.get("ok"):
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
    return _score(status, workload, density_target, scratch, limits, on_selection=on_selection)


def _score(status: dict[str, Any], workload: Any, density_target: float, scratch: ScratchView | None, limits: SandboxLimits,
           *, on_selection: SelectionHook | None = None) -> ScoreReport:
    entries = status.get("records")
    if not isinstance(entries, list) or len(entries) != len(workload.records):
        return ScoreReport.failure("crash", "the candidate process reported the wrong number of selections")
    if scratch is None:
        return ScoreReport.failure("harness", "the sandbox worker's scratch is gone")
    total = 0
    rows = []
    for i, (rec, entry) in enumerate(zip(workload.records, entries)):
        where = f"sample {rec.sample}, layer {rec.layer}"
        try:
            # Our name, not the worker's, read without following links: no path tricks.
            try:
                data = scratch.read(f"out/rec{i}.safetensors", limits.output_bytes - total)
            except OverCap:
                return ScoreReport.failure("output", f"selections exceed {limits.output_bytes} bytes (at {where})")
            if data is None:
                raise ProtocolError(f"selection file for {where} is missing")
            total += len(data)
            meta = entry.get("meta") if isinstance(entry, dict) else None
            if not isinstance(meta, dict):
                raise ProtocolError(f"no metadata for {where}")
            if dense_meta_ok(meta, rec.weights_shape, rec.queries.device):
                # The common case: unpack on the workload's device (1/32 of the float32 bytes
                # cross to it). Anything else goes through decode_selection, which words the
                # validator's reason for a wrong type, shape, device or dtype.
                selection = decode_dense_on_device(load(data), rec.weights_shape, rec.queries.device)
            else:
                selection = decode_selection(None, meta, rec, tensors=load(data))
            weights = dense_weights(selection, rec)
            rows.append((rec.sample, rec.layer, *record_scores(rec, weights)))
        except InvalidSelection as exc:
            return ScoreReport.failure("invalid", f"{where}: {exc}")
        except ProtocolError as exc:
            return ScoreReport.failure("crash", f"the candidate process wrote a malformed result: {exc}")
        except Exception as exc:  # noqa: BLE001 - a corrupt file must not crash the evaluator
            return ScoreReport.failure("crash", f"the candidate process wrote an unreadable result for {where}: "
                                       f"{type(exc).__name__}: {exc}"[:1000])
        if on_selection is not None:
            # Outside the try: the hook is trusted code, so its failure is ours, not the candidate's.
            on_selection(i, rec, weights)
    return aggregate(rows, density_target)
