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
    """The parent's side of the fast score's result stream: decodes, validates and scores each
    record's selection as it arrives (``RecordScorer`` chunks), while the worker computes the next,
    or (``score_after``) all of them once the worker is done.

    The first problem (in record order) is kept and later selections are only drained, so that
    the worker's own status (an exception or memory failure further on) still takes precedence,
    as when everything was read after the worker exited.
    """

    def __init__(self, workload: Any, density_target: float, limits: SandboxLimits,
                 on_selection: SelectionHook | None, score_after: bool = False) -> None:
        """``score_after``: keep each message as it arrives and decode and score them all in
        ``finish``, after the worker, instead of alongside it (see ``runner.score_after_worker``)."""
        self.records = workload.records
        self.density_target = density_target
        self.limits = limits
        self.scorer = RecordScorer(self.records, on_selection)
        self.received = 0
        self.total = 0
        self.failure: ScoreReport | None = None
        self._kept: list[tuple[dict[str, Any], dict[str, torch.Tensor]]] | None = [] if score_after else None
        self._batch: list[DenseBytes] = []  # checked dense selections not yet decoded, from record ``received - len``

    def take(self, header: dict[str, Any], tensors: dict[str, torch.Tensor], size: int) -> bool:
        """One record's message; False once more reading is pointless (over the output cap)."""
        self.total += size + 1024
        if self.total > self.limits.output_bytes:
            self._score_kept()  # what came before, in order: an earlier problem stays the first
            self._decode_batch()
            where = self._where(min(self.received, len(self.records) - 1))
            self._fail(ScoreReport.failure("output", f"selections exceed {self.limits.output_bytes} bytes (at {where})"))
            return False
        if self._kept is not None:
            self._kept.append((header, tensors))
        else:
            self._score(header, tensors)
        return True

    def _score_kept(self) -> None:
        """Decode and score the kept messages, in arrival order."""
        kept, self._kept = self._kept, ([] if self._kept is not None else None)
        for header, tensors in kept or ():
            self._score(header, tensors)

    def _score(self, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Check, decode and score one record's message (keeping the first problem)."""
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
            # the host now and unpacked on the workload's device with the rest of its chunk
            # (1/32 of the float32 bytes cross to it). Anything else goes through
            # decode_selection, which words the validator's reason for a wrong type, shape,
            # device or dtype.
            sent = dense_selection_bytes(meta, tensors, rec.weights_shape, rec.keys.shape[1], rec.queries.device)
            if sent is None:
                weights = plain_weights(decode_selection(None, meta, rec, tensors=tensors), rec)
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
        if sent is None:
            self._decode_batch()  # the records before it, in order
            self._add([(i, weights)])
            return
        if self._batch and not batchable(self._batch[0], sent):
            self._decode_batch()
        self._batch.append(sent)
        if len(self._batch) == self.scorer.chunk or self.received == len(self.records):
            self._decode_batch()

    def _decode_batch(self) -> None:
        """Decode the checked selections waiting in ``_batch`` and hand them to the scorer."""
        if self.failure is not None:
            self._batch = []  # drained
            return
        self._add(self._take_batch())

    def _take_batch(self) -> list[tuple[int, torch.Tensor]]:
        """Empty ``_batch``: its records' indices and decoded weights."""
        batch, self._batch = self._batch, []
        if not batch:
            return []
        first = self.received - len(batch)
        return list(enumerate(decode_dense_batch(batch, self.records[first].queries.device), first))

    def _add(self, weights: list[tuple[int, torch.Tensor]]) -> None:
        """Give records' validated-shape weights to the scorer; an invalid one becomes the failure."""
        try:
            # Outside _score's try: the scorer and the on_selection hook are trusted code, whose
            # failure is ours, not the candidate's (weights reaching them are well-formed).
            for i, w in weights:
                self.scorer.add(i, w)
        except RecordInvalid as exc:
            self._fail(ScoreReport.failure("invalid", f"{exc.where}: {exc}"))

    def finish(self, status: dict[str, Any] | None) -> None:
        """Score the kept messages and what is still pending, if the worker's ``status`` says it is done."""
        self._score_kept()
        self._decode_batch()
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
        """Keep the first problem; an invalid selection in a record still pending comes before it."""
        if self.failure is not None:
            return
        try:
            for i, w in self._take_batch():
                self.scorer.add(i, w)
            self.scorer.flush()
        except RecordInvalid as exc:
            report = ScoreReport.failure("invalid", f"{exc.where}: {exc}")
        self.failure = report

    def _where(self, i: int) -> str:
        rec = self.records[i]
        return f"sample {rec.sample}, layer {rec.layer}"
