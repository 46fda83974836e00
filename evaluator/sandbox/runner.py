"""The trusted side of the sandbox: hand a candidate to a worker, score what it streams back,
and turn how the worker ended into a report."""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from evaluator.sandbox.limits import SandboxLimits
from evaluator.sandbox.pool import WorkerPool
from evaluator.sandbox.result_stream import ResultStream, SelectionHook
from evaluator.sandbox.transport import workload_inputs
from evaluator.sandbox.worker_process import Worker, WorkerOutcome
from evaluator.scoring import ScoreReport
from evaluator.threads import evaluation_threads


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
    stream = ResultStream(workload, density_target, limits, on_selection, score_after=score_after_worker(device))
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


def score_after_worker(device: torch.device) -> bool:
    """Whether the parent decodes and scores a fast score's selections after the worker is done
    rather than a chunk at a time as they arrive (each message is checked on the host as it
    arrives either way). On a CPU slot both sides compute on the host with every core
    (``evaluation_threads``), so running them side by side only makes them take turns at a
    higher price: on the 2-core box, 16 records of ``default``'s shapes, sink_window took 1.23 s
    scored after the worker against 1.49-1.53 s alongside it, oracle_topk 3.30 against 3.81-4.23
    (``benchmarks/profile_fast_score.py --device cpu --records 16``). On an H200 scoring alongside
    did better: one slot of the scheduler ran 238, 255 and 244 evaluations a minute alongside
    against 228, 240 and 220 after, in three runs alternating the two in one call
    (``benchmarks/bench_throughput.py --parts scale --slots 1 --flip-scoring``, synthetic)."""
    return device.type == "cpu"


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
