"""An interactive sandbox session: one untrusted candidate answering many masker calls.

The fast score hands a worker every record at once; faithful scoring cannot, because each
call's queries and keys depend on the previous calls' selections. A session keeps one worker
(the same isolation as ``evaluate_in_sandbox``: own process group, rlimits, scrubbed
environment, ``nobody`` as root, audit hook) and talks to it through two FIFOs in its
two pipes handed to it as fds with the job (``evaluator.sandbox.channel``):

* parent -> worker, per call: the call's queries, the keys it appended, the query positions
  (never values or dense outputs); keys of a long shared prefix can be sent once, as a
  read-only file (sent as an fd) the worker copies into its own key cache (``setup["prefix"]``);
  a spare of a pool that ``prefetch``-ed that file holds its keys on the device before the job;
* on a GPU, both directions can go through one block of device memory the parent owns and
  maps into the worker (``evaluator.sandbox.devshare``; ``setup["shared"]`` sizes its input
  and output regions): a call's tensors are copied into the input region and a well-formed
  dense selection comes back as float32 in the output region, which the parent clones before
  it validates anything; the pipes then carry headers only. Calls that do not fit, and any
  other selection, take the pipe path below;
* worker -> parent, per call: the selection in the exact compact form of
  ``evaluator.sandbox.transport.encode_selection``, bit-packed on the worker's device and
  unpacked on ours (``evaluator.sandbox.devicepack``); sparse and malformed selections go
  through ``transport.decode_selection``, which words the validator's reasons.

Every failure raises ``SessionFailure`` with a categorised ``ScoreReport`` (the categories of
the fast score): the worker died (``crash``, or its own ``import``/``exception``/``memory``
status), the candidate's time ran out (``timeout``: ``limits.wall_s`` bounds the candidate's
share, i.e. the time the parent spends waiting on it), it printed too much or answered too
much (``output``), it answered garbage (``crash``) or broke the contract (``invalid``). The
worker's whole process tree is killed on close, whatever happened.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from evaluator.records import AttentionRecord
from evaluator.contract import per_query_heads
from evaluator.sandbox import devshare
from evaluator.sandbox.devicepack import decode_dense_selection, dense_shape_sent
from evaluator.sandbox.channel import ChannelError, ChannelOverflow, DeadlineIO, pack
from evaluator.sandbox.limits import SandboxLimits
from evaluator.sandbox.pool import SMALL_MACHINE_CORES, WorkerPool
from evaluator.sandbox.runner import _interpret, _syntax_context
from evaluator.sandbox.worker_process import Worker, WorkerOutcome, widen_pipe
from evaluator.sandbox.transport import ProtocolError, decode_selection
from evaluator.scoring import InvalidSelection, ScoreReport
from evaluator.threads import evaluation_threads


SESSION_PIPE_BYTES = 1 << 20  # a whole call or reply of the faithful preset (~150-190 KB) without a wait
# How long each side polls for the other's message before sleeping (see channel.spin_until_readable):
# about one layer's turn of the faithful preset. "0" turns it off, for measurement.
SPIN_ENV = "ADRS_SESSION_SPIN_MS"
SPIN_S = 0.005
SHARED_ENV = "ADRS_SESSION_SHARED"  # "0": never offer a shared device block (measurement, or a misbehaving driver)
PROFILE_ENV = "ADRS_PROFILE_SESSION"  # "1": the worker logs the mean time of each phase of a call


def session_spin_s() -> float:
    """Seconds each side of a session polls before sleeping: ``SPIN_S`` where cores are plentiful;
    0 on small machines, where a polling parent would take the worker's core (``ADRS_SESSION_SPIN_MS`` overrides)."""
    if os.environ.get(SPIN_ENV):
        return float(os.environ[SPIN_ENV]) / 1e3
    return SPIN_S if (os.cpu_count() or 1) > SMALL_MACHINE_CORES else 0.0


def shared_sizes(rows: int, heads: int, kv_heads: int, head_dim: int, max_len: int, max_q: int = 1) -> dict[str, int]:
    """``setup["shared"]`` for calls of up to ``max_q`` query tokens: the input region holds queries,
    new keys and positions (at most 8 bytes an element, plus alignment), the output region the
    largest well-formed dense selection (float32, every query head). Larger calls take the pipes."""
    inputs = 8 * max_q * (rows * (heads + kv_heads) * head_dim + 1) + 3 * devshare.ALIGN
    return {"in": inputs, "out": 4 * rows * heads * max_q * max_len}


class SessionFailure(Exception):
    """The session ended because of the candidate (or the harness); ``report`` says how."""

    def __init__(self, report: ScoreReport) -> None:
        super().__init__(f"{report.category}: {report.reason}")
        self.report = report


class _Abort(Exception):
    """Raised inside the channel's wait loop; carries the failure to report."""

    def __init__(self, report: ScoreReport) -> None:
        super().__init__(report.reason)
        self.report = report


class SandboxSession:
    """Parent side of one session. Use as a context manager; ``call`` once per masker call."""

    def __init__(self, candidate_path: str | Path, device: str | torch.device, density_target: float, base_seed: int,
                 setup: dict[str, Any], limits: SandboxLimits | None = None, pool: WorkerPool | None = None) -> None:
        self.candidate_path = Path(candidate_path)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # Workers compare the device of what the masker returns with this string: "cuda"
            # would never equal the "cuda:0" of a returned tensor.
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.density_target = density_target
        self.base_seed = base_seed
        self.setup = dict(setup)
        self.limits = pool.limits if pool is not None else (limits or SandboxLimits())
        self.pool = pool
        self.worker: Worker | None = None
        self.io: DeadlineIO | None = None
        self._fds: list[int] = []
        self.candidate_s = 0.0  # time spent waiting on the candidate, against limits.wall_s
        self._wait_started = 0.0
        self.calls = 0
        self.shared: devshare.SharedBlock | None = None  # until the worker's hello says it mapped it too
        self._shared_offered = False
        self._out_at = 0
        self.shared_calls = 0  # calls answered through the shared block

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Check syntax, start (or take) a worker and hand it the session job."""
        try:
            source = self.candidate_path.read_text()
            compile(source, str(self.candidate_path), "exec")  # compiling runs nothing: safe here
        except SyntaxError as exc:
            raise SessionFailure(ScoreReport.failure("syntax", f"line {exc.lineno}: {exc.msg}", details=_syntax_context(exc)))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise SessionFailure(ScoreReport.failure("import", f"cannot read candidate: {exc}"))
        if self.pool is not None and self.pool.cuda != (self.device.type == "cuda"):
            raise ValueError(f"WorkerPool(cuda={self.pool.cuda}) cannot serve a session on {self.device}")
        # Two pipes (calls in, selections out), handed to the worker as fds with the job.
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        for fd in (req_w, resp_w):
            widen_pipe(fd, SESSION_PIPE_BYTES)
        self._fds = [resp_r, req_w]
        worker_fds = {"req": req_r, "resp": resp_w}
        prefix_path = self.setup.pop("prefix", None)
        if prefix_path:
            worker_fds["prefix"] = os.open(prefix_path, os.O_RDONLY | os.O_CLOEXEC)
        self._offer_shared(worker_fds)
        spin_s = session_spin_s()
        self.io = DeadlineIO(resp_r, req_w, self._check, self.limits.output_bytes, self._pulse, spin_s)
        job = {"candidate_name": self.candidate_path.name, "source": source, "device": str(self.device),
               "density_target": self.density_target, "base_seed": self.base_seed,
               "num_threads": evaluation_threads(self.device), "session": self.setup,
               "profile": os.environ.get(PROFILE_ENV) == "1", "spin_s": spin_s}
        if self.pool is not None:
            # The replacement starts when the session closes: a spare starting meanwhile (CUDA context,
            # rehearsal kernels) would share the GPU with every one of the session's round trips.
            with self.pool.deferred_spare(always=True):
                self.worker = self.pool.take()
        else:
            self.worker = Worker(self.limits, cuda=self.device.type == "cuda")
        if prefix_path and getattr(self.worker, "preloaded", None) == Path(prefix_path):
            job["prefix_preloaded"] = True  # the warm spare holds the prefix keys on the device already
        try:
            if not self.worker.wait_ready(self.limits.startup_s):  # IsolationUnavailable passes through
                raise OSError("worker not ready")
            self.worker.send_job(job, worker_fds)
        except OSError:
            raise SessionFailure(self._report(job_sent=False)) from None
        finally:
            for fd in worker_fds.values():
                os.close(fd)  # the worker holds its own copies now: its death reads as EOF here

    def _offer_shared(self, worker_fds: dict[str, int]) -> None:
        """Allocate the shared block the setup asks for and add its fd to the worker's files;
        without CUDA or driver support the setup loses the request and calls use the pipes."""
        wanted = self.setup.pop("shared", None)
        if not wanted or self.device.type != "cuda" or os.environ.get(SHARED_ENV) == "0":
            return
        out_at = -(-int(wanted["in"]) // devshare.ALIGN) * devshare.ALIGN
        block = devshare.allocate(out_at + int(wanted["out"]), self.device)
        if block is None:
            return
        assert block.fd is not None
        worker_fds["shared"], block.fd = block.fd, None  # closed with the other handed-over fds
        self.shared, self._shared_offered, self._out_at = block, True, out_at
        self.setup["shared"] = {"bytes": block.size, "out_at": out_at}

    @property
    def isolation(self) -> str | None:
        """How the worker is contained, in words (None before start)."""
        return self.worker.isolation if self.worker is not None else None

    def close(self) -> None:
        """Kill the worker's tree, close our pipe ends, free its scratch. Safe to call twice."""
        if self.worker is not None:
            if self.worker.alive() and self.io is not None:
                # A polite goodbye; the kill below does not depend on it, so a full pipe is fine.
                with contextlib.suppress(OSError):
                    os.write(self._fds[1], pack({"op": "close"}, {}))
            self.worker.release()
            if self.pool is not None:
                self.pool.replenish()
        self.close_shared()
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self) -> "SandboxSession":
        try:
            self.start()
        except BaseException:
            self.close()  # __exit__ does not run when __enter__ raises
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ calls
    def call(self, header: dict[str, Any], tensors: dict[str, torch.Tensor], record: AttentionRecord) -> Any:
        """Send one call's inputs, wait for the selection, rebuild it for ``record``.

        Returns the selection as the candidate returned it (dense tensor or SparseSelection,
        on ``record``'s device); the caller validates it with ``evaluator.scoring.dense_weights``.
        """
        assert self.io is not None, "call() before start()"
        self._wait_started = time.monotonic()
        try:
            if self._shared_offered:
                self._shared_offered = False
                hello, _ = self.io.receive()  # whether the worker mapped the block
                if hello.get("op") != "hello":
                    raise ChannelError("the worker did not say whether it mapped the shared block")
                if hello.get("shared") is not True:
                    self.close_shared()
            places = self._shared_places(tensors, record)
            via_shared = places is not None
            if places is not None:
                self._put_inputs(tensors, places)
                self.io.send(pack({"op": "call", **header, "shared": places}, {}))
            else:
                self.io.send(pack({"op": "call", **header}, {k: v.detach().cpu().contiguous() for k, v in tensors.items()}))
            reply, data = self.io.receive()
        except _Abort as exc:
            raise SessionFailure(exc.report) from None
        except ChannelOverflow as exc:
            raise SessionFailure(ScoreReport.failure("output", f"the candidate answered too much: {exc}")) from None
        except ChannelError as exc:
            raise SessionFailure(ScoreReport.failure("crash", f"the candidate process wrote a malformed reply: {exc}")) from None
        finally:
            self.candidate_s += time.monotonic() - self._wait_started
        self.calls += 1
        self.check_output()
        where = f"call {header.get('call')}, layer {header.get('layer')}"
        meta = reply.get("meta")
        try:
            if not isinstance(meta, dict):
                raise ProtocolError("no selection metadata")
            if reply.get("shared") is not None:
                if reply.get("shared") is not True or not via_shared:
                    raise ProtocolError("a selection in the shared block that was not asked for")
                return self._shared_selection(meta, record)
            dense = decode_dense_selection(meta, data, record.weights_shape, record.keys.shape[1], record.queries.device)
            if dense is not None:
                return dense
            return decode_selection(None, meta, record, tensors=data)  # sparse, or the validator's reason
        except InvalidSelection as exc:
            raise SessionFailure(ScoreReport.failure("invalid", f"{where}: {exc}")) from None
        except ProtocolError as exc:
            raise SessionFailure(ScoreReport.failure("crash", f"the candidate process wrote a malformed result: {exc}")) from None
        except Exception as exc:  # noqa: BLE001 - corrupt data must not crash the evaluator
            raise SessionFailure(ScoreReport.failure(
                "crash", f"the candidate process wrote an unreadable result for {where}: {type(exc).__name__}: {exc}"[:1000])) from None

    def close_shared(self) -> None:
        """Unmap the shared block (the worker could not map it, or the session ends); calls then go over the pipes."""
        if self.shared is not None:
            torch.cuda.synchronize(self.device)  # no copy of ours may still read or write the block
            self.shared.close()
            self.shared = None

    def _shared_places(self, tensors: dict[str, torch.Tensor], record: AttentionRecord) -> list[list[Any]] | None:
        """Where this call's tensors go in the input region (``devshare.layout``), or None when they or
        its largest well-formed answer do not fit the shared block (the call then takes the pipes)."""
        if self.shared is None or any(str(t.dtype) not in devshare.DTYPES for t in tensors.values()):
            return None
        places, used = devshare.layout(tensors)
        fits = used <= self._out_at and self._out_at + 4 * math.prod(record.weights_shape) <= self.shared.size
        return places if fits else None

    def _put_inputs(self, tensors: dict[str, torch.Tensor], places: list[list[Any]]) -> None:
        """Copy the call's tensors to their ``places`` and wait for the copies (the worker reads them
        as soon as the call arrives)."""
        assert self.shared is not None
        for name, _dtype, shape, at in places:
            self.shared.tensor(at, tensors[name].dtype, tuple(shape)).copy_(tensors[name])
        torch.cuda.current_stream(self.device).synchronize()

    def _shared_selection(self, meta: dict[str, Any], record: AttentionRecord) -> torch.Tensor:
        """The float32 selection the worker left in the output region, cloned before anything looks at
        it (the worker can still write there) and repeated for each query head if sent per KV head."""
        assert self.shared is not None
        shape = record.weights_shape
        sent = dense_shape_sent(meta, shape, record.keys.shape[1], record.queries.device)
        if sent is None:
            raise ProtocolError("the shared block's selection does not match its metadata")
        weights = self.shared.tensor(self._out_at, torch.float32, sent).clone()
        self.shared_calls += 1
        return per_query_heads(weights, shape[1], sent[1])

    def check_output(self) -> None:
        """Raise SessionFailure if the worker printed past the log cap (a quick reply would hide it)."""
        if self.worker is not None and self.worker._reader.exceeded.is_set():
            raise SessionFailure(self._report(log_exceeded=True))

    def _pulse(self) -> None:
        """Called as bytes flow: raise _Abort on timeout or too much output (a trickle is no way around them)."""
        worker = self.worker
        assert worker is not None
        if worker._reader.exceeded.is_set():
            raise _Abort(self._report(log_exceeded=True))
        if self.candidate_s + time.monotonic() - self._wait_started > self.limits.wall_s:
            raise _Abort(self._report(timed_out=True))

    def _check(self) -> None:
        """Called while the worker is not ready: raise _Abort on timeout, death or too much output."""
        self._pulse()
        worker = self.worker
        assert worker is not None
        if not worker.alive():
            raise _Abort(self._report())

    def _report(self, job_sent: bool = True, timed_out: bool = False, log_exceeded: bool = False) -> ScoreReport:
        """The fast score's interpretation of how the worker ended (after killing it)."""
        worker = self.worker
        assert worker is not None
        worker.close()
        status = worker.read_status()
        if status is not None and status.get("ok"):
            status = None  # a session only ends "ok" when we close it: this is a mid-session exit
        outcome = WorkerOutcome(worker.proc.returncode, timed_out, log_exceeded or worker._reader.exceeded.is_set(),
                                worker._reader.text(), status, self.candidate_s, job_sent)
        report = _interpret(outcome, self.limits)
        if report.category == "timeout":
            report.reason = f"the candidate used more than {self.limits.wall_s:g} s over its masker calls and was killed"
        return report
