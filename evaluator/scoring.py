"""The trusted scorer: validate a selection, compute sparse attention, aggregate scores.

Numbers follow the published evolve_masker evaluator so that results are comparable:
density = selected / causal tokens per record, error = ||O_dense - O_sparse||_F / ||O_dense||_F
per record, both averaged over records; penalty = 100 * max(0, density - target);
combined = -(error + penalty). Every number is computed here, never by the candidate.

kv_density = distinct KV rows read per (batch, KV head, query) / causal tokens, averaged like
density: a KV row counts once for a GQA group however many of its query heads select it, which
is what a decode kernel that shares one gather per group reads. It equals density when every
head of a group selects the same keys (or without GQA) and is up to ``G`` times density when
the group's heads pick disjoint keys.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch

from evaluator.contract import SparseSelection, expand_kv, per_query_heads
from evaluator.records import AttentionRecord

# Estimator weights are 1/p with p <= 1; allow float rounding of 1/p just below 1.
WEIGHT_TOLERANCE = 1e-5

FAILURE_CATEGORIES = (
    "syntax", "import", "exception", "timeout", "memory", "invalid", "crash", "output", "harness", "mutation",
    "worker_lost",  # the evaluation worker or node died mid-evaluation, retries spent: not the candidate's fault
)


class InvalidSelection(ValueError):
    """A selection that breaks the contract; the message is the reason shown to the model."""


@dataclass
class LayerScore:
    layer: int
    error: float
    density: float
    kv_density: float | None = None


class ReportCodec:
    """``to_dict``/``from_dict``/``failure`` shared by the fast and the faithful report dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        data = dict(data)
        data["per_layer"] = [LayerScore(**x) for x in data.get("per_layer", [])]
        return cls(**data)

    @classmethod
    def failure(cls, category: str, reason: str, details: str | None = None, **extra: Any) -> Any:
        """An invalid report: no numbers, a category from FAILURE_CATEGORIES and a reason."""
        if category not in FAILURE_CATEGORIES:
            raise ValueError(f"unknown failure category {category!r}")
        return cls(valid=False, category=category, reason=reason, details=details, **extra)


@dataclass
class ScoreReport(ReportCodec):
    """Result of scoring one candidate on one workload. Invalid results carry no score."""

    valid: bool
    combined_score: float | None = None
    error: float | None = None
    density: float | None = None
    density_penalty: float | None = None
    density_target: float | None = None
    per_layer: list[LayerScore] = field(default_factory=list)
    worst: dict[str, Any] | None = None
    n_records: int = 0
    wall_s: float = 0.0
    category: str | None = None
    reason: str | None = None
    details: str | None = None
    workload: str | None = None
    isolation: str | None = None  # how the candidate was contained (sandbox level), or None in-process
    kv_density: float | None = None  # distinct KV rows read per query and KV head / causal tokens
    # Measured decode speedup of the selections (the trusted kernel vs dense SDPA, on a GPU), when asked for;
    # speedup_info says how it was measured, or why not. speedup_penalty: set under a speedup objective.
    speedup: float | None = None
    speedup_penalty: float | None = None
    speedup_info: dict[str, Any] | None = None


def _check_plain_tensor(x: Any, what: str) -> torch.Tensor:
    if type(x) is not torch.Tensor:
        raise InvalidSelection(f"{what} must be a plain torch.Tensor, got {type(x).__module__}.{type(x).__qualname__}")
    return x


def dense_weights(selection: Any, record: AttentionRecord) -> torch.Tensor:
    """Validate ``selection`` against ``record`` and return float32 weights ``[b, h, q, k]``.

    Raises InvalidSelection with a reason a model can act on.
    """
    shape = record.weights_shape
    device = record.queries.device
    selection = per_query_heads(selection, shape[1], record.keys.shape[1])
    if type(selection) is SparseSelection:
        weights = _sparse_to_dense(selection, shape, device, record)
    elif isinstance(selection, SparseSelection):
        raise InvalidSelection("selection must be evaluator.contract.SparseSelection itself, not a subclass")
    else:
        weights = _check_plain_tensor(selection, "selection")
        if tuple(weights.shape) != shape:
            raise InvalidSelection(f"selection has shape {tuple(weights.shape)}, expected {expected_shapes(record)}")
        if weights.device != device:
            raise InvalidSelection(f"selection is on {weights.device}, inputs are on {device}")
        if not (weights.dtype.is_floating_point or weights.dtype == torch.bool):
            raise InvalidSelection(f"selection dtype {weights.dtype} is not floating point or bool")
        weights = weights.detach().to(torch.float32)
    _check_values(weights, record.positions)
    return weights


def expected_shapes(record: AttentionRecord, sparse: bool = False) -> str:
    """The shapes a selection of ``record`` may have, in words: per query head, or per KV head under GQA."""
    b, h, q, k = record.weights_shape
    h_kv = record.keys.shape[1]
    if sparse:
        per_head = f"[b, h, q, n] with [b, h, q] = {(b, h, q)}"
        per_kv = f"[b, h_kv, q, n] with [b, h_kv, q] = {(b, h_kv, q)}"
    else:
        per_head, per_kv = f"[b, h, q, k] = {(b, h, q, k)}", f"[b, h_kv, q, k] = {(b, h_kv, q, k)}"
    if h_kv == h:
        return per_head
    return f"{per_head} (per query head) or {per_kv} (per KV head, shared by its GQA group)"


def _sparse_to_dense(sel: SparseSelection, shape: tuple[int, int, int, int], device: torch.device,
                     record: AttentionRecord) -> torch.Tensor:
    idx = _check_plain_tensor(sel.indices, "SparseSelection.indices")
    w = _check_plain_tensor(sel.weights, "SparseSelection.weights")
    if idx.dim() != 4 or tuple(idx.shape[:3]) != shape[:3] or idx.shape != w.shape:
        raise InvalidSelection(
            f"SparseSelection indices {tuple(idx.shape)} and weights {tuple(w.shape)} must both be "
            f"{expected_shapes(record, sparse=True)}"
        )
    if idx.device != device or w.device != device:
        raise InvalidSelection(f"SparseSelection is on {idx.device}/{w.device}, inputs are on {device}")
    if idx.dtype not in (torch.int32, torch.int64) or not w.dtype.is_floating_point:
        raise InvalidSelection(f"SparseSelection needs integer indices and float weights, got {idx.dtype}/{w.dtype}")
    idx = idx.long()
    used = idx >= 0
    if bool((idx < -1).any()) or bool((idx >= shape[3]).any()):
        raise InvalidSelection(f"SparseSelection index out of range [-1, {shape[3] - 1}]")
    w = w.detach().to(torch.float32)
    if bool((used & (w == 0)).any()):
        raise InvalidSelection("SparseSelection lists an index with weight 0; leave it out or pad with -1")
    safe = idx.clamp(min=0)
    counts = torch.zeros(shape, dtype=torch.int32, device=device)
    counts.scatter_add_(3, safe, used.to(torch.int32))
    if bool((counts > 1).any()):
        raise InvalidSelection("SparseSelection lists the same key twice for one query")
    dense = torch.zeros(shape, dtype=torch.float32, device=device)
    dense.scatter_add_(3, safe, torch.where(used, w, torch.zeros_like(w)))
    return dense


def _check_values(weights: torch.Tensor, positions: torch.Tensor) -> None:
    if not bool(torch.isfinite(weights).all()):
        raise InvalidSelection("selection has NaN or infinite weights")
    if bool((weights < 0).any()):
        raise InvalidSelection("selection has negative weights")
    fractional = (weights > 0) & (weights < 1 - WEIGHT_TOLERANCE)
    if bool(fractional.any()):
        raise InvalidSelection(
            "selection has weights strictly between 0 and 1; use 0 for 'not attended' and w >= 1 (w = 1/p) for attended tokens"
        )
    keys = torch.arange(weights.shape[3], device=weights.device)
    future = keys[None, :] > positions.to(weights.device)[:, None]  # [q, k]
    if bool((weights.ne(0) & future).any()):
        raise InvalidSelection("selection attends to future (non-causal) tokens")
    empty = weights.ne(0).sum(dim=3) == 0
    if bool(empty.any()):
        raise InvalidSelection(f"selection is empty for {int(empty.sum())} of {empty.numel()} (batch, head, query) rows")


def sparse_attention(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, weights: torch.Tensor, scaling: float,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``[b, h, q, d]`` output of the weighted estimator ``sum w e^s v / sum w e^s``.

    Weights enter as ``log w`` added to the logits, so huge weights cannot overflow and the
    max-subtraction of softmax keeps it stable. Weights must be validated first.
    """
    h = queries.shape[1]
    k = expand_kv(keys, h).to(dtype)
    v = expand_kv(values, h).to(dtype)
    logits = torch.matmul(queries.to(dtype), k.transpose(-1, -2)) * scaling
    logits = logits + torch.log(weights.to(dtype))  # log 0 = -inf removes unselected keys
    return torch.matmul(torch.softmax(logits, dim=-1), v)


def causal_weights(record_shape: tuple[int, int, int, int], positions: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Weights selecting every causal key with weight 1 (dense attention)."""
    keys = torch.arange(record_shape[3], device=device)
    mask = keys[None, :] <= positions.to(device)[:, None]
    return mask.to(torch.float32).expand(record_shape).contiguous()


def dense_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, scaling: float,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Causal dense attention ``[b, h, q, d]`` at the given query positions, computed in ``dtype``."""
    b, h, q, _ = queries.shape
    w = causal_weights((b, h, q, keys.shape[2]), positions, queries.device)
    return sparse_attention(queries, keys, values, w, scaling, dtype=dtype)


def record_precision(record: AttentionRecord) -> torch.dtype:
    """The precision a record is scored in: float64 for records made by ``at_precision(.., float64)``, else float32."""
    return torch.float64 if record.dense_out.dtype == torch.float64 else torch.float32


def at_precision(record: AttentionRecord, dtype: torch.dtype) -> AttentionRecord:
    """``record`` to be scored in ``dtype``: the same inputs, the dense reference recomputed in ``dtype``.

    The numerics audit scores selections against float64 records: a gain that is a float32
    rounding artifact of the estimator disappears there. Maskers still see float32 inputs.
    """
    q, k, v = (x.to(dtype) for x in (record.queries, record.keys, record.values))
    out = dense_attention(q, k, v, record.positions, record.scaling, dtype=dtype)
    return AttentionRecord(record.sample, record.layer, record.num_layers, q, k, v, record.positions, record.scaling, out)


def relative_error(dense_out: torch.Tensor, sparse_out: torch.Tensor) -> float:
    """``||O_dense - O_sparse||_F / ||O_dense||_F`` in float64."""
    d = dense_out.double()
    return float(torch.linalg.vector_norm(d - sparse_out.double()) / torch.linalg.vector_norm(d))


def score_record(record: AttentionRecord, selection: Any, dtype: torch.dtype | None = None) -> tuple[float, float]:
    """(relative error, density) of one validated selection on one record."""
    return score_weights(record, dense_weights(selection, record), dtype)


def score_weights(record: AttentionRecord, w: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[float, float]:
    """(relative error, density) of weights already validated by ``dense_weights``.

    The sparse output is computed in ``dtype`` (default: the record's precision, see
    ``record_precision``); the reference is the record's dense output.
    """
    dtype = record_precision(record) if dtype is None else dtype
    out = sparse_attention(record.queries, record.keys, record.values, w, record.scaling, dtype=dtype)
    selected = float(w.ne(0).sum())
    causal = float((record.positions.to(torch.float64) + 1).clamp(max=record.keys.shape[2]).sum()) * w.shape[0] * w.shape[1]
    return relative_error(record.dense_out, out), selected / causal


def kv_selected(w: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Weights ``[..., h, q, k]`` -> bool ``[..., h_kv, q, k]``: the keys some query head of each GQA
    group selects (what kv_density counts: a key once per group, however many of its heads pick it)."""
    return w.ne(0).unflatten(-3, (num_kv_heads, w.shape[-3] // num_kv_heads)).any(dim=-3)


def kv_density(record: AttentionRecord, w: torch.Tensor) -> float:
    """Distinct KV rows read per (batch, KV head, query) / causal tokens, for validated weights ``[b, h, q, k]``:
    a key counts once for a GQA group however many of the group's query heads select it."""
    b, _, _, k = w.shape
    h_kv = record.keys.shape[1]
    rows = float(kv_selected(w, h_kv).sum())
    causal = float((record.positions.to(torch.float64) + 1).clamp(max=k).sum()) * b * h_kv
    return rows / causal


def record_scores(record: AttentionRecord, w: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[float, float, float]:
    """(relative error, density, kv_density) of validated weights: ``score_weights`` plus ``kv_density``."""
    return (*score_weights(record, w, dtype), kv_density(record, w))


def _mean(values: list[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else sum(values) / len(values)  # type: ignore[arg-type]


def aggregate(results: Iterable[tuple], density_target: float) -> ScoreReport:
    """Combine per-record ``(sample, layer, error, density[, kv_density])`` into a report."""
    rows = [tuple(r) + (None,) * (5 - len(r)) for r in results]
    if not rows:
        return ScoreReport.failure("harness", "no records were scored")
    error = sum(r[2] for r in rows) / len(rows)
    density = sum(r[3] for r in rows) / len(rows)
    kv = _mean([r[4] for r in rows])
    penalty = 100.0 * max(0.0, density - density_target)
    by_layer: dict[int, list[tuple]] = {}
    for row in rows:
        by_layer.setdefault(row[1], []).append(row)
    per_layer = [
        LayerScore(layer, sum(r[2] for r in v) / len(v), sum(r[3] for r in v) / len(v), _mean([r[4] for r in v]))
        for layer, v in sorted(by_layer.items())
    ]
    worst = max(rows, key=lambda r: r[2])
    if not all(math.isfinite(x) for x in (error, density, 0.0 if kv is None else kv)):
        return ScoreReport.failure("harness", "scorer produced a non-finite number")
    return ScoreReport(
        valid=True, combined_score=-(error + penalty), error=error, density=density,
        density_penalty=penalty, density_target=density_target, per_layer=per_layer,
        worst={"sample": worst[0], "layer": worst[1], "error": worst[2], "density": worst[3]},
        n_records=len(rows), kv_density=kv,
    )
