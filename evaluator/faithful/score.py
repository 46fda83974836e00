"""Faithful scoring of one candidate: sparse attention in every layer of a real decode.

The model and its KV cache stay in this (trusted) process. A ``FaithfulContext`` loads the
model, builds the spec's needle prompts, runs the dense prefill of the contexts once and the
dense reference decode once; every candidate then reuses them. Per candidate, the question
and ``decode_steps`` generated tokens run sparse in all layers, the selections coming either
from a sandbox session (default: the candidate runs isolated and only selections come back)
or, for trusted code, from the masker called in process. Both paths hand the masker the same
tensors and validate with ``evaluator.batch_scoring.validated_weights``, so their numbers are equal.

Batching: one masker call serves every sample and both row groups (teacher-forced and
free-running, see ``evaluator.faithful.metrics``): ``queries [2n, h, q, d]``, ``keys [2n,
h_kv, k, d]``, one shared ``query_positions``. ``state`` is per layer and persists across the
calls of one decode (the batch rows are always the same samples, in the same order). The
generator of call ``c`` in layer ``l`` is seeded with ``record_seed(spec.seed, c, l)``.
"""
from __future__ import annotations

import os
import time
import uuid
import weakref
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from evaluator.threads import evaluation_threads, torch_threads
from evaluator.inprocess import IN_PROCESS
from evaluator.candidate import format_traceback, load_masker
from evaluator.contract import MaskerInput
from evaluator.faithful.decode import CallInputs, DecodeTrace, SparseDecoder, causal_selector
from evaluator.faithful.metrics import FaithfulReport, call_scores, distribution_scores, needle_answers
from evaluator.faithful.prompts import NeedlePrompts, build_prompts
from evaluator.faithful.spec import FaithfulSpec, resolve_faithful_spec
from evaluator.records import AttentionRecord, record_seed
from evaluator.sandbox.limits import SandboxLimits
from evaluator.sandbox.pool import WorkerPool
from evaluator.sandbox.session import SandboxSession, SessionFailure, shared_sizes
from evaluator.sandbox.transport import SESSION_PREFIX, remove_file, shared_dir
from evaluator.batch_scoring import validated_weights
from evaluator.scoring import InvalidSelection
from evaluator.workload.model import load_model

ROW_GROUPS = 2  # teacher-forced rows, then free-running rows


class CandidateFailure(Exception):
    """A candidate failed during decoding; carries the categorised report."""

    def __init__(self, category: str, reason: str, details: str | None = None) -> None:
        super().__init__(f"{category}: {reason}")
        self.category, self.reason, self.details = category, reason, details


def _call_record(inputs: CallInputs) -> AttentionRecord:
    """The fast score's record view of a call, for ``dense_weights`` (values are not needed)."""
    empty = inputs.queries.new_empty(0)
    return AttentionRecord(-1, inputs.layer, inputs.num_layers, inputs.queries, inputs.keys, empty,
                           inputs.positions, inputs.scaling, empty)


def _validated(selection: Any, inputs: CallInputs) -> torch.Tensor:
    try:
        return validated_weights(selection, _call_record(inputs))
    except InvalidSelection as exc:
        raise CandidateFailure("invalid", f"call {inputs.call}, layer {inputs.layer}: {exc}") from None


def in_process_selector(masker: Callable[[MaskerInput], Any], density_target: float, base_seed: int) -> Callable[[CallInputs], torch.Tensor]:
    """Selector calling ``masker`` here (trusted code only), on copies of the call's tensors."""
    states: dict[int, dict[str, Any]] = {}

    def select(inputs: CallInputs) -> torch.Tensor:
        gen = torch.Generator(device=inputs.queries.device)
        gen.manual_seed(record_seed(base_seed, inputs.call, inputs.layer))
        inp = MaskerInput(
            queries=inputs.queries.clone(memory_format=torch.contiguous_format),
            keys=inputs.keys.clone(memory_format=torch.contiguous_format), scaling=inputs.scaling,
            query_positions=inputs.positions.clone(), layer_idx=inputs.layer, num_layers=inputs.num_layers,
            density_target=density_target, generator=gen, state=states.setdefault(inputs.layer, {}),
        )
        try:
            selection = masker(inp)
        except Exception as exc:  # noqa: BLE001 - a candidate's bug becomes a structured failure
            category = "memory" if isinstance(exc, (MemoryError, torch.OutOfMemoryError)) else "exception"
            raise CandidateFailure(category, f"{type(exc).__name__}: {exc} (call {inputs.call}, layer {inputs.layer})",
                                   format_traceback()) from None
        return _validated(selection, inputs)

    return select


def session_selector(session: SandboxSession) -> Callable[[CallInputs], torch.Tensor]:
    """Selector asking a sandbox session; only queries, new keys and positions cross over."""

    def select(inputs: CallInputs) -> torch.Tensor:
        header = {"layer": inputs.layer, "call": inputs.call, "start": inputs.start,
                  "scaling": inputs.scaling, "num_layers": inputs.num_layers}
        tensors = {"q": inputs.queries, "k": inputs.new_keys, "pos": inputs.positions}
        try:
            selection = session.call(header, tensors, _call_record(inputs))
        except SessionFailure as exc:
            r = exc.report
            raise CandidateFailure(r.category or "crash", r.reason or "", r.details) from None
        return _validated(selection, inputs)

    return select


class FaithfulContext:
    """Model, prompts, dense prefill and dense reference of one spec, shared by many candidates."""

    def __init__(self, spec: str | FaithfulSpec, device: str | torch.device | None = None) -> None:
        self.spec = resolve_faithful_spec(spec)
        self.spec.check_fits()
        t0 = time.perf_counter()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.tokenizer = load_model(self.spec.model, device=self.device)
        # "cuda" -> "cuda:0": workers compare device strings of what the masker returns.
        self.device = next(self.model.parameters()).device
        self.prompts: NeedlePrompts = build_prompts(self.spec, self.tokenizer)
        n, total = self.spec.n_samples, self.spec.prompt_tokens
        self.context_len = total - self.prompts.sparse_tokens
        self.decoder = SparseDecoder(self.model, rows=ROW_GROUPS * n, max_len=total + self.spec.decode_steps)
        self.decoder.prefill(self.prompts.ids[:, :self.context_len])
        self.reference: DecodeTrace = self._decode(causal_selector, teacher=None)
        self.setup_s = time.perf_counter() - t0
        self._prefix: Path | None = None
        self._finalizer: Any = None
        # (process group, marker) of the latest sandbox worker: lets tests prove nothing is left.
        self.last_worker: tuple[int, str] | None = None
        # (masker calls, of which through the shared device block) of the latest sandboxed score.
        self.last_calls: tuple[int, int] | None = None

    def _decode(self, selector: Callable[[CallInputs], torch.Tensor], teacher: torch.Tensor | None) -> DecodeTrace:
        return self.decoder.decode(self.prompts.ids[:, self.context_len:], self.context_len, self.spec.decode_steps,
                                   selector, teacher)

    def prefix_file(self) -> Path:
        """Keys of the dense context of every layer ``[n, h_kv, context, d]``, written once for workers."""
        if self._prefix is None:
            n = self.spec.n_samples
            self._prefix = write_prefix_file([k[:n, :, :self.context_len] for k in self.decoder.store.keys])
            self._finalizer = weakref.finalize(self, remove_file, self._prefix)
        return self._prefix

    def close(self) -> None:
        """Remove the prefix file (also done when the context is garbage-collected or at exit)."""
        if self._finalizer is not None:
            self._finalizer()
        self._prefix = None

    def score(self, candidate_path: str | Path, density_target: float = 0.10, limits: SandboxLimits | None = None,
              in_process: bool = False, pool: WorkerPool | None = None) -> FaithfulReport:
        """Faithful score of one candidate file (sandboxed unless ``in_process``)."""
        t0 = time.perf_counter()
        candidate_s = None
        isolation = None
        try:
            if in_process:
                isolation = IN_PROCESS
                with torch_threads(evaluation_threads(self.device)):  # as its sandbox session's worker has
                    trace = self._decode(in_process_selector(_load_trusted(candidate_path), density_target, self.spec.seed),
                                         self.reference.teacher_tokens)
            else:
                prefix = self.prefix_file()
                setup = {"prefix": str(prefix), "row_groups": ROW_GROUPS,
                         "max_len": self.spec.prompt_tokens + self.spec.decode_steps, "shared": self._shared_sizes()}
                if pool is not None:
                    # The pool's next spares load these keys onto the GPU before their job arrives.
                    pool.prefetch(prefix, str(self.device))
                with SandboxSession(candidate_path, self.device, density_target, self.spec.seed, setup, limits, pool) as session:
                    if session.worker is not None:
                        self.last_worker = (session.worker.pgid, session.worker.marker)
                    trace = self._decode(session_selector(session), self.reference.teacher_tokens)
                    session.check_output()
                candidate_s = session.candidate_s
                isolation = session.isolation
                self.last_calls = (session.calls, session.shared_calls)
        except SessionFailure as exc:
            return self._failed(exc.report.category or "crash", exc.report.reason or "", exc.report.details, t0)
        except CandidateFailure as exc:
            return self._failed(exc.category, exc.reason, exc.details, t0)
        report = self._report(trace, density_target)
        report.wall_s = time.perf_counter() - t0
        report.candidate_s = candidate_s
        report.isolation = isolation
        return report

    def _shared_sizes(self) -> dict[str, int]:
        """The session's shared device block, sized for this model's largest call: the question's tokens at once."""
        rows, kv_heads, max_len, head_dim = self.decoder.store.keys[0].shape
        return shared_sizes(rows, self.model.config.num_attention_heads, kv_heads, head_dim, max_len,
                            max_q=self.prompts.sparse_tokens)

    def _failed(self, category: str, reason: str, details: str | None, t0: float) -> FaithfulReport:
        report = FaithfulReport.failure(category, reason, details, **self._shape())
        report.wall_s = time.perf_counter() - t0
        return report

    def _shape(self) -> dict[str, Any]:
        return {"spec": self.spec.label, "n_samples": self.spec.n_samples, "decode_steps": self.spec.decode_steps,
                "prompt_tokens": self.spec.prompt_tokens, "sparse_tokens": self.prompts.sparse_tokens}

    def _report(self, trace: DecodeTrace, density_target: float) -> FaithfulReport:
        ref = self.reference
        acc, dense_acc, answers = needle_answers(self.tokenizer, self.prompts.answers, trace.free_tokens.cpu(),
                                                 ref.teacher_tokens.cpu())
        return FaithfulReport(
            valid=True, density_target=density_target, **call_scores(trace.stats, density_target),
            **distribution_scores(ref.logprobs, trace.logprobs, ref.teacher_tokens),
            needle_accuracy=acc, dense_needle_accuracy=dense_acc, answers=answers, **self._shape(),
        )


def _load_trusted(path: str | Path) -> Callable[[MaskerInput], Any]:
    """Import a candidate in this process; its failures become CandidateFailure."""
    try:
        source = Path(path).read_text()
        compile(source, str(path), "exec")
    except SyntaxError as exc:
        raise CandidateFailure("syntax", f"line {exc.lineno}: {exc.msg}") from None
    try:
        return load_masker(path)
    except Exception as exc:  # noqa: BLE001
        raise CandidateFailure("import", f"{type(exc).__name__}: {exc}", format_traceback()) from None


def write_prefix_file(keys: list[torch.Tensor]) -> Path:
    """Every layer's prefix keys ``[n, h_kv, length, d]`` in a private file for session workers
    (``setup["prefix"]``); the caller removes it."""
    tensors = {f"k{i}": k.contiguous().cpu() for i, k in enumerate(keys)}
    need = sum(t.numel() * t.element_size() for t in tensors.values()) + (1 << 20)
    path = shared_dir(need) / f"adrs-faithful-{os.getpid()}-{uuid.uuid4().hex[:8]}.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"kind": SESSION_PREFIX})
    os.chmod(tmp, 0o600)  # workers get it as an open fd: nobody else needs to read it
    os.replace(tmp, path)
    return path


def faithful_score(candidate_path: str | Path, spec: str | FaithfulSpec = "faithful", density_target: float = 0.10,
                   limits: SandboxLimits | None = None, in_process: bool = False, *,
                   context: FaithfulContext | None = None, pool: WorkerPool | None = None,
                   device: str | torch.device | None = None) -> FaithfulReport:
    """Faithful score of a candidate file on ``spec``.

    Pass a ``FaithfulContext`` to score many candidates with one model load, prefill and
    dense reference (it must be for the same spec); otherwise one is built and dropped.
    """
    own = context is None
    ctx = FaithfulContext(spec, device) if context is None else context
    if not own and ctx.spec != resolve_faithful_spec(spec):
        raise ValueError(f"context is for {ctx.spec.label}, not {resolve_faithful_spec(spec).label}")
    try:
        return ctx.score(candidate_path, density_target, limits, in_process, pool)
    finally:
        if own:
            ctx.close()
