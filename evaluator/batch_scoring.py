"""The fast score's trusted scorer over many records at once: few large kernels, few host syncs.

``RecordScorer`` takes each record's float32 weights in record order (as the masker or the
sandbox produces them) and validates and scores them in fixed chunks of consecutive records
(``chunk_size``): one stacked ``[n, h, q, k]`` validation with a single host sync, and one
batched sparse attention per chunk. Per record, the numbers are those of
``evaluator.scoring.score_weights`` up to the rounding of batched kernels; the in-process path
and the sandbox both score through this class with the same chunks, so their numbers are
bit-identical to each other. The wording of an invalid selection is ``scoring``'s own: the
first failing record is re-checked alone by ``scoring._check_values``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from evaluator.contract import per_query_heads
from evaluator.records import AttentionRecord
from evaluator.scoring import (
    WEIGHT_TOLERANCE, InvalidSelection, _check_values, dense_weights, kv_selected, record_precision, sparse_attention,
)

# Float32 weights + logits of one chunk stay near this; only the chunk size depends on it. On the
# host, batching saves little (no launches to amortise) and big chunks fall out of cache.
CHUNK_BYTES = {"cuda": 1 << 30, "cpu": 64 << 20}
MAX_CHUNK = 32

# Called by the trusted scorer with (record index, record, validated float32 weights [b, h, q, k]).
SelectionHook = Callable[[int, AttentionRecord, torch.Tensor], None]


class RecordInvalid(InvalidSelection):
    """A selection broke the contract; ``index`` is its record's position in the workload."""

    def __init__(self, index: int, record: AttentionRecord, reason: str) -> None:
        super().__init__(reason)
        self.index, self.record = index, record

    @property
    def where(self) -> str:
        return f"sample {self.record.sample}, layer {self.record.layer}"


def chunk_size(record: AttentionRecord) -> int:
    """Records per chunk, from the first record's shape and device only (so every path chunks alike)."""
    b, h, q, k = record.weights_shape
    per_record = 4 * b * h * q * k * 4  # weights, log-weights, logits, probabilities (float32)
    budget = CHUNK_BYTES.get(record.queries.device.type, CHUNK_BYTES["cpu"])
    return max(1, min(MAX_CHUNK, budget // max(1, per_record)))


def plain_weights(selection: Any, record: AttentionRecord) -> torch.Tensor:
    """Float32 weights of a selection, value checks left to ``RecordScorer`` (they run batched).

    A plain dense tensor of the record's shape, device and a float or bool dtype is only cast;
    anything else goes through ``scoring.dense_weights`` (its own checks and wording). A
    per-KV-head selection is first repeated for each query head of its GQA group.
    """
    selection = per_query_heads(selection, record.weights_shape[1], record.keys.shape[1])
    if (type(selection) is torch.Tensor and tuple(selection.shape) == record.weights_shape
            and selection.device == record.queries.device
            and (selection.dtype.is_floating_point or selection.dtype == torch.bool)):
        return selection.detach().to(torch.float32, copy=True)  # a masker may reuse its output buffer
    return dense_weights(selection, record)


def validated_weights(selection: Any, record: AttentionRecord) -> torch.Tensor:
    """``scoring.dense_weights`` with its value checks in one host sync (the same rules and wording)."""
    weights = plain_weights(selection, record)
    if bool(_invalid_flags(weights, record.positions.to(weights.device)[None], weights.shape[0]).any()):
        _check_values(weights, record.positions)
        raise InvalidSelection("selection failed validation")  # the batched check is stricter: never expected
    return weights


class RecordScorer:
    """Validates and scores records' weights chunk by chunk; ``rows()`` gives (sample, layer, error, density, kv_density)."""

    def __init__(self, records: tuple[AttentionRecord, ...] | list[AttentionRecord], on_selection: SelectionHook | None = None) -> None:
        self.records = records
        self.chunk = chunk_size(records[0]) if records else 1
        self.on_selection = on_selection
        self._pending: list[tuple[int, torch.Tensor]] = []
        self._rows: list[tuple[int, int, float, float, float]] = []

    def add(self, index: int, weights: torch.Tensor) -> None:
        """Record ``index``'s float32 weights (indices must come in order); may raise RecordInvalid."""
        if index != len(self._rows) + len(self._pending):
            raise ValueError(f"record {index} out of order")
        self._pending.append((index, weights))
        if len(self._pending) == self.chunk or index == len(self.records) - 1:
            self.flush()

    def flush(self) -> None:
        """Validate and score what is pending; RecordInvalid for the first invalid record among it."""
        pending, self._pending = self._pending, []
        start = 0
        while start < len(pending):
            end = start + 1
            first = self.records[pending[start][0]]
            while end < len(pending) and _same_batch(first, self.records[pending[end][0]]):
                end += 1
            self._score_group(pending[start:end])
            start = end

    def rows(self) -> list[tuple[int, int, float, float, float]]:
        self.flush()
        return self._rows

    def _score_group(self, group: list[tuple[int, torch.Tensor]]) -> None:
        recs = [self.records[i] for i, _ in group]
        w = torch.cat([x for _, x in group]) if len(group) > 1 else group[0][1]
        positions = torch.stack([r.positions.to(w.device) for r in recs])  # [n, q]
        bad = _invalid_flags(w, positions, recs[0].weights_shape[0])
        if bad.any():
            first = int(bad.nonzero()[0])
            index, rec = group[first][0], recs[first]
            try:
                _check_values(group[first][1], rec.positions)
            except InvalidSelection as exc:
                raise RecordInvalid(index, rec, str(exc)) from None
            raise RecordInvalid(index, rec, "selection failed validation")  # the batched check is stricter: never expected
        rows = _score_batch(recs, w, positions)
        for (index, weights), rec, (err, dens, kv) in zip(group, recs, rows):
            self._rows.append((rec.sample, rec.layer, err, dens, kv))
            if self.on_selection is not None:
                self.on_selection(index, rec, weights)


def _same_batch(a: AttentionRecord, b: AttentionRecord) -> bool:
    return (a.weights_shape == b.weights_shape and a.keys.shape == b.keys.shape and a.scaling == b.scaling
            and a.queries.dtype == b.queries.dtype and a.dense_out.dtype == b.dense_out.dtype
            and a.queries.device == b.queries.device)


def _invalid_flags(w: torch.Tensor, positions: torch.Tensor, b: int) -> torch.Tensor:
    """``[n]`` bool (on the host): record breaks any of ``scoring._check_values``'s rules. One sync."""
    n = positions.shape[0]
    per = w.reshape(n, -1, w.shape[2], w.shape[3])  # [n, b*h, q, k]
    nz = per.ne(0)
    keys = torch.arange(w.shape[3], device=w.device)
    future = keys[None, None, :] > positions[:, :, None]  # [n, q, k]
    flags = torch.stack([
        ~torch.isfinite(per).flatten(1).all(1),
        (per < 0).flatten(1).any(1),
        ((per > 0) & (per < 1 - WEIGHT_TOLERANCE)).flatten(1).any(1),
        (nz & future[:, None]).flatten(1).any(1),
        ~nz.any(3).flatten(1).all(1),
    ])
    return flags.any(0).cpu()


def _score_batch(recs: list[AttentionRecord], w: torch.Tensor, positions: torch.Tensor) -> list[tuple[float, float, float]]:
    """(relative error, density, kv_density) per record of one batch of like records, as ``scoring.record_scores``."""
    first = recs[0]
    cat = (lambda xs: torch.cat(xs)) if len(recs) > 1 else (lambda xs: xs[0])
    q, k, v = cat([r.queries for r in recs]), cat([r.keys for r in recs]), cat([r.values for r in recs])
    dense = cat([r.dense_out for r in recs])
    out = sparse_attention(q, k, v, w, first.scaling, dtype=record_precision(first))
    n = len(recs)
    d = dense.double().reshape(n, -1)
    err = torch.linalg.vector_norm(d - out.double().reshape(n, -1), dim=1) / torch.linalg.vector_norm(d, dim=1)
    selected = w.reshape(n, -1).ne(0).sum(1)
    b, h, _, kk = first.weights_shape
    tokens = (positions.to(torch.float64) + 1).clamp(max=kk).sum(1)
    causal = tokens * b * h
    # kv_density: a key counts once per GQA group, however many of its query heads select it.
    h_kv = first.keys.shape[1]
    kv_rows = kv_selected(w, h_kv).reshape(n, -1).sum(1)
    dev = err.device
    out3 = torch.stack([err, selected.to(torch.float64) / causal.to(dev),
                        kv_rows.to(torch.float64) / (tokens * b * h_kv).to(dev)]).cpu().tolist()
    return list(zip(out3[0], out3[1], out3[2]))
