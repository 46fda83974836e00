"""The parent's side of the fast score's result stream (see ``evaluator.sandbox.worker``).

The worker sends one message per record (``channel.pack``: ``{"i", "meta"}`` and the encoded
selection) and its status last. Nothing in them is trusted: the record order is checked, the
bytes are capped, each selection is decoded with the validator's wording
(``transport``/``devicepack``) and scored by ``evaluator.batch_scoring.RecordScorer``.
"""
from __future__ import annotations

from typing import Any

import torch

from evaluator.batch_scoring import RecordInvalid, RecordScorer, SelectionHook, plain_weights
from evaluator.sandbox.devicepack import DenseBytes, batchable, decode_dense_batch, dense_selection_bytes
from evaluator.sandbox.limits import SandboxLimits
from evaluator.sandbox.transport import ProtocolError, decode_selection
from evaluator.scoring import InvalidSelection, ScoreReport, aggregate


class ResultStream:
    """The parent's side of the fast score's result stream. Each record's message is checked on the
    host as it arrives (order, metadata, sizes); the device work, decoding and scoring in
    ``RecordScorer`` chunks, runs either per chunk alongside the worker or (``score_after``) once
    the worker is done.

    The first problem (in record order) is kept and later selections are only drained, so that
    the worker's own status (an exception or memory failure further on) still takes precedence,
    as when everything was read after the worker exited.
    """

    def __init__(self, workload: Any, density_target: float, limits: SandboxLimits,
                 on_selection: SelectionHook | None, score_after: bool = False) -> None:
        """``score_after``: leave decoding and scoring until ``finish``, after the worker, instead of
        doing them chunk by chunk alongside it (see ``runner.score_after_worker``)."""
        self.records = workload.records
        self.density_target = density_target
        self.limits = limits
        self.scorer = RecordScorer(self.records, on_selection)
        self.score_after = score_after
        self.received = 0
        self.total = 0
        self.failure: ScoreReport | None = None
        # Checked selections not yet scored, from record ``received - len``: a dense one's bytes
        # (decoded with its neighbours) or, for any other kind, its weights.
        self._pending: list[DenseBytes | torch.Tensor] = []

    def take(self, header: dict[str, Any], tensors: dict[str, torch.Tensor], size: int) -> bool:
        """One record's message; False once more reading is pointless (over the output cap)."""
        self.total += size + 1024
        if self.total > self.limits.output_bytes:
            where = self._where(min(self.received, len(self.records) - 1))
            self._fail(ScoreReport.failure("output", f"selections exceed {self.limits.output_bytes} bytes (at {where})"))
            return False
        self._check(header, tensors)
        due = len(self._pending) >= self.scorer.chunk or self.received == len(self.records)
        # Any other kind than a dense selection is float32 weights already: scored now in either
        # mode, so that no more than a chunk of them is ever held (a sparse candidate's 120
        # records of ``default`` would be 1.1 GB).
        if (due and not self.score_after) or (self._pending and isinstance(self._pending[-1], torch.Tensor)):
            self._score_now()
        return True

    def _check(self, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Check one record's message and queue its selection (keeping the first problem)."""
        if self.failure is not None:
            return  # drained: the worker's status may still explain more than the first problem
        i = self.received
        if i >= len(self.records) or header.get("i") != i:
            self._fail(ScoreReport.failure("crash", f"the candidate process wrote a malformed result: "
                                           f"selection {str(header.get('i'))[:40]} where {i} was due"))
            return
        rec = self.records[i]
        try:
            meta = header.get("meta")
            if not isinstance(meta, dict):
                raise ProtocolError(f"no metadata for {self._where(i)}")
            # The common case, a dense selection (per query head or per KV head), is checked on
            # the host here and unpacked on the workload's device with its chunk (1/32 of the
            # float32 bytes cross to it). Anything else goes through decode_selection, which
            # words the validator's reason for a wrong type, shape, device or dtype.
            item: DenseBytes | torch.Tensor | None = dense_selection_bytes(
                meta, tensors, rec.weights_shape, rec.keys.shape[1], rec.queries.device)
            if item is None:
                item = plain_weights(decode_selection(None, meta, rec, tensors=tensors), rec)
        except InvalidSelection as exc:
            self._fail(ScoreReport.failure("invalid", f"{self._where(i)}: {exc}"))
            return
        except ProtocolError as exc:
            self._fail(ScoreReport.failure("crash", f"the candidate process wrote a malformed result: {exc}"))
            return
        except Exception as exc:  # noqa: BLE001 - a corrupt message must not crash the evaluator
            self._fail(ScoreReport.failure("crash", f"the candidate process wrote an unreadable result for {self._where(i)}: "
                                           f"{type(exc).__name__}: {exc}"[:1000]))
            return
        self.received += 1
        self._pending.append(item)

    def _score_now(self) -> None:
        """Decode and score what is pending; an invalid selection becomes the failure."""
        if self.failure is not None:
            return
        try:
            # Outside _check's try: the scorer and the on_selection hook are trusted code, whose
            # failure is ours, not the candidate's (weights reaching them are well-formed).
            self._score_pending()
        except RecordInvalid as exc:
            self._fail(ScoreReport.failure("invalid", f"{exc.where}: {exc}"))

    def _score_pending(self) -> None:
        """Hand the pending selections to the scorer in record order, decoding runs of like dense
        ones a chunk at a time (so at most a chunk of float32 weights is decoded at once); may
        raise RecordInvalid."""
        pending, self._pending = self._pending, []  # once a record is invalid, the rest is drained
        index = self.received - len(pending)
        start = 0
        while start < len(pending):
            first, end = pending[start], start + 1
            if isinstance(first, DenseBytes):
                while (end < len(pending) and end - start < self.scorer.chunk
                       and isinstance(pending[end], DenseBytes) and batchable(first, pending[end])):
                    end += 1
                weights = decode_dense_batch(pending[start:end], self.records[index].queries.device)
            else:
                weights = [first]
            for w in weights:
                self.scorer.add(index, w)
                index += 1
            start = end

    def finish(self, status: dict[str, Any] | None) -> None:
        """Score what is pending, if the worker's ``status`` says it is done."""
        self._score_now()
        if self.failure is None and status is not None and status.get("ok") \
                and self.received == len(self.records):
            try:
                self.scorer.flush()
            except RecordInvalid as exc:
                self.failure = ScoreReport.failure("invalid", f"{exc.where}: {exc}")

    def report(self, status: dict[str, Any]) -> ScoreReport:
        """The report of a worker whose status says it succeeded."""
        if self.failure is not None:
            return self.failure
        if status.get("records") != len(self.records) or self.received != len(self.records):
            return ScoreReport.failure("crash", "the candidate process reported the wrong number of selections")
        return aggregate(self.scorer.rows(), self.density_target)

    def _fail(self, report: ScoreReport) -> None:
        """Keep the first problem; an invalid selection in a record checked before it comes first."""
        if self.failure is not None:
            return
        try:
            self._score_pending()
            self.scorer.flush()
        except RecordInvalid as exc:
            report = ScoreReport.failure("invalid", f"{exc.where}: {exc}")
        self.failure = report

    def _where(self, i: int) -> str:
        rec = self.records[i]
        return f"sample {rec.sample}, layer {rec.layer}"
