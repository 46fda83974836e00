"""The trusted side of the sandbox: start workers, hand them a job, kill them, score the result."""
from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file

from evaluator.sandbox.isolation import NOBODY, is_root, kill_tree, scrubbed_env
from evaluator.sandbox.limits import SandboxLimits
from evaluator.sandbox.devicepack import decode_dense_on_device, dense_meta_ok
from evaluator.sandbox.transport import ProtocolError, decode_selection, workload_inputs
from evaluator.records import AttentionRecord
from evaluator.scoring import InvalidSelection, ScoreReport, aggregate, dense_weights, score_weights

_REPO_ROOT = str(Path(__file__).resolve().parents[2])
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


class Worker:
    """One sandbox process: started (imports torch), then used for exactly one candidate."""

    def __init__(self, limits: SandboxLimits, cuda: bool = False) -> None:
        self.limits = limits
        self.marker = uuid.uuid4().hex
        env = scrubbed_env(os.environ, self.marker, _REPO_ROOT)
        if cuda:
            env["ADRS_SANDBOX_CUDA"] = "1"
        ready_r, ready_w = os.pipe()
        # -s: no user site-packages; the scrubbed env and cwd "/" keep the caller's setup out.
        self.proc = subprocess.Popen(
            [sys.executable, "-s", "-m", "evaluator.sandbox.worker", str(ready_w), limits.to_json()],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=env, cwd="/", start_new_session=True, pass_fds=(ready_w,), close_fds=True,
        )
        os.close(ready_w)
        self.pgid = self.proc.pid  # start_new_session: the worker leads its own group
        self._ready_fd = ready_r
        self._reader = _CappedReader(self.proc.stdout, limits.log_bytes)
        self._reader.start()
        self.cuda = cuda

    def wait_ready(self, timeout: float) -> bool:
        """True once the worker has imported everything and waits for its job."""
        if self._ready_fd < 0:
            return True
        ready, _, _ = select.select([self._ready_fd], [], [], max(0.0, timeout))
        ok = bool(ready) and os.read(self._ready_fd, 1) == b"R"
        os.close(self._ready_fd)
        self._ready_fd = -1
        return ok

    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(self, job: dict[str, Any], scratch: Path) -> WorkerOutcome:
        """Hand over the job, wait at most ``wall_s``, kill the whole tree, collect what is left."""
        t0 = time.monotonic()
        timed_out = False
        job_sent = False
        try:
            if not self.wait_ready(self.limits.startup_s):
                raise _StartupFailed()
            self.proc.stdin.write((json.dumps(job) + "\n").encode())
            self.proc.stdin.close()
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
                             self._reader.text(), _read_status(scratch / "status.json"), elapsed, job_sent)

    def close(self) -> None:
        """Kill the worker and every descendant (even those that left the group), reap it."""
        kill_tree(self.pgid, self.marker)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._reader.join(timeout=2)
        if self._ready_fd >= 0:
            os.close(self._ready_fd)
            self._ready_fd = -1


class _StartupFailed(Exception):
    pass


def _read_status(path: Path) -> dict[str, Any] | None:
    try:
        if path.is_symlink() or path.stat().st_size > _MAX_STATUS:
            return None
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


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
                spare.close()
            return Worker(self.limits, self.cuda)
        return spare

    def close(self) -> None:
        if self._spare is not None:
            self._spare.close()
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
    scratch = Path(tempfile.mkdtemp(prefix="adrs-sandbox-"))
    try:
        candidate = scratch / candidate_path.name
        candidate.write_text(source)
        if is_root():
            # The worker runs as nobody: it owns scratch and nothing else it could write to.
            os.chown(scratch, NOBODY, NOBODY)
            os.chown(candidate, NOBODY, NOBODY)
        job = {"scratch": str(scratch), "inputs": str(inputs), "candidate": str(candidate), "device": str(device),
               "density_target": density_target, "base_seed": base_seed, "num_threads": torch.get_num_threads()}
        if pool is None:
            worker = Worker(limits, cuda=device.type == "cuda")
        else:
            with pool.deferred_spare():  # subclasses may override take(): still call it
                worker = pool.take()
        try:
            outcome = worker.run(job, scratch)
            report = _interpret(outcome, limits, workload, density_target, scratch, on_selection=on_selection)
        finally:
            if pool is not None:
                # Candidate killed and scored: the replacement's start-up now overlaps what the
                # caller does next (the next proposal), not the candidate's run or our scoring,
                # which it slowed 3-6x on 2 cores.
                pool.replenish()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
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


def _interpret(outcome: WorkerOutcome, limits: SandboxLimits, workload: Any, density_target: float, scratch: Path,
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


def _score(status: dict[str, Any], workload: Any, density_target: float, scratch: Path, limits: SandboxLimits,
           *, on_selection: SelectionHook | None = None) -> ScoreReport:
    entries = status.get("records")
    if not isinstance(entries, list) or len(entries) != len(workload.records):
        return ScoreReport.failure("crash", "the candidate process reported the wrong number of selections")
    out = scratch / "out"
    total = 0
    rows = []
    for i, (rec, entry) in enumerate(zip(workload.records, entries)):
        path = out / f"rec{i}.safetensors"  # our name, not the worker's: no path tricks
        where = f"sample {rec.sample}, layer {rec.layer}"
        try:
            if path.is_symlink() or not path.is_file():
                raise ProtocolError(f"selection file for {where} is missing")
            total += path.stat().st_size
            if total > limits.output_bytes:
                return ScoreReport.failure("output", f"selections exceed {limits.output_bytes} bytes (at {where})")
            meta = entry.get("meta") if isinstance(entry, dict) else None
            if not isinstance(meta, dict):
                raise ProtocolError(f"no metadata for {where}")
            if dense_meta_ok(meta, rec.weights_shape, rec.queries.device):
                # The common case: unpack on the workload's device (1/32 of the float32 bytes
                # cross to it). Anything else goes through decode_selection, which words the
                # validator's reason for a wrong type, shape, device or dtype.
                selection = decode_dense_on_device(load_file(str(path)), rec.weights_shape, rec.queries.device)
            else:
                selection = decode_selection(path, meta, rec)
            weights = dense_weights(selection, rec)
            rows.append((rec.sample, rec.layer, *score_weights(rec, weights)))
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
