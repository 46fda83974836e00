"""Faithful-scoring numbers and the report that carries them.

Definitions (``n`` samples, ``S`` decode steps, so ``S + 1`` next-token predictions each):

* error, density, per-layer, worst: as in the fast score, but per masker *call* of the
  sparse decode (one call = one layer of one forward pass, all rows of the batch):
  ``||O_dense - O_sparse||_F / ||O_dense||_F`` where both outputs are computed from the same
  inputs of that call (the sparse trajectory's queries, keys and values), and
  selected / causal keys; averaged over calls. Penalty and combined score as in the fast score.
* agreement and KL: teacher forcing. The sparse model is fed the dense model's greedy tokens,
  so at every step both condition on the same prefix and their distributions are comparable
  step by step while the sparse errors still compound through the KV cache of the question
  and generated tokens. agreement = fraction of the ``n * (S + 1)`` predictions whose argmax
  equals the dense greedy token; kl = mean ``KL(p_dense || p_sparse)`` in nats (kl_max: the
  largest single one).
* needle accuracy: free running. A second group of rows in the same batch decodes greedily
  from the sparse model's own tokens, as in real use; a sample is correct when the first run
  of digits in its generated text is the pass key. ``dense_needle_accuracy`` is the same
  measure for dense greedy decoding (the ceiling for this model).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from evaluator.faithful.decode import CallStats
from evaluator.faithful.prompts import first_number
from evaluator.scoring import LayerScore, ReportCodec


@dataclass
class FaithfulReport(ReportCodec):
    """Result of faithful scoring of one candidate; invalid results carry no numbers."""

    valid: bool
    spec: str | None = None
    density_target: float | None = None
    combined_score: float | None = None
    error: float | None = None
    density: float | None = None
    kv_density: float | None = None  # distinct KV rows read per query and KV head / causal tokens, as in the fast score
    density_penalty: float | None = None
    per_layer: list[LayerScore] = field(default_factory=list)
    worst: dict[str, Any] | None = None
    n_calls: int = 0
    agreement: float | None = None
    kl: float | None = None
    kl_max: float | None = None
    needle_accuracy: float | None = None
    dense_needle_accuracy: float | None = None
    answers: list[dict[str, Any]] = field(default_factory=list)
    n_samples: int = 0
    decode_steps: int = 0
    prompt_tokens: int = 0
    sparse_tokens: int = 0
    wall_s: float = 0.0
    candidate_s: float | None = None  # sandboxed: time spent waiting on the worker (its masker calls + transport)
    category: str | None = None
    reason: str | None = None
    details: str | None = None
    isolation: str | None = None  # how the candidate was contained (sandbox level), or None in-process


def call_scores(stats: CallStats, density_target: float) -> dict[str, Any]:
    """Fast-score style aggregates over the calls of one decode."""
    errors = torch.stack(stats.errors).cpu().tolist()
    densities = torch.stack(stats.densities).cpu().tolist()
    kv_densities = torch.stack(stats.kv_densities).cpu().tolist()
    error = sum(errors) / len(errors)
    density = sum(densities) / len(densities)
    kv_density = sum(kv_densities) / len(kv_densities)
    if not all(math.isfinite(x) for x in (error, density, kv_density)):
        raise FloatingPointError("faithful scorer produced a non-finite error or density")
    by_layer: dict[int, list[tuple[float, float, float]]] = {}
    for layer, e, d, kd in zip(stats.layers, errors, densities, kv_densities):
        by_layer.setdefault(layer, []).append((e, d, kd))
    per_layer = [LayerScore(layer, *(sum(row[i] for row in v) / len(v) for i in range(3)))
                 for layer, v in sorted(by_layer.items())]
    w = max(range(len(errors)), key=errors.__getitem__)
    penalty = 100.0 * max(0.0, density - density_target)
    return {
        "combined_score": -(error + penalty), "error": error, "density": density, "kv_density": kv_density,
        "density_penalty": penalty,
        "per_layer": per_layer, "n_calls": len(errors),
        "worst": {"call": stats.calls[w], "layer": stats.layers[w], "error": errors[w], "density": densities[w]},
    }


def distribution_scores(dense_logprobs: torch.Tensor, sparse_logprobs: torch.Tensor, dense_tokens: torch.Tensor) -> dict[str, float]:
    """Teacher-forced agreement and KL(dense || sparse) over ``[n, steps + 1, vocab]`` log-probs."""
    p = dense_logprobs.exp()
    kl = (p * (dense_logprobs - sparse_logprobs)).sum(-1).clamp(min=0.0)
    agree = sparse_logprobs.argmax(-1).eq(dense_tokens.to(sparse_logprobs.device)).double()
    return {"agreement": float(agree.mean()), "kl": float(kl.mean()), "kl_max": float(kl.max())}


def needle_answers(tokenizer: Any, answers: tuple[str, ...], sparse_tokens: torch.Tensor,
                   dense_tokens: torch.Tensor) -> tuple[float, float, list[dict[str, Any]]]:
    """(sparse accuracy, dense accuracy, per-sample answers) of free-running greedy decoding."""
    rows = []
    for i, answer in enumerate(answers):
        sparse_text = tokenizer.decode(sparse_tokens[i].tolist())
        dense_text = tokenizer.decode(dense_tokens[i].tolist())
        rows.append({"answer": answer, "sparse": sparse_text, "dense": dense_text,
                     "correct": first_number(sparse_text) == answer, "dense_correct": first_number(dense_text) == answer})
    n = max(1, len(rows))
    return sum(r["correct"] for r in rows) / n, sum(r["dense_correct"] for r in rows) / n, rows
