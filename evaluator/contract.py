"""The candidate contract: what a masker receives and what it must return.

This is the only module of the harness that candidate code may import. A candidate file
defines ``masker(inp: MaskerInput) -> Selection`` inside its EVOLVE block.

A selection says, for every query, which keys take part in attention and with what
estimator weight: 0 means "not attended", ``w >= 1`` means "attended with weight w"
(``w = 1/p`` for a token sampled with probability p, 1 for a deterministic pick). The
trusted scorer computes ``O = sum_i w_i exp(s_i) v_i / sum_i w_i exp(s_i)`` over the
selected keys; values are never shown to the masker.

A selection is given per query head (leading shape ``[b, h, q]``) or per KV head (``[b, h_kv, q]``,
dense ``[b, h_kv, q, k]`` or a ``SparseSelection`` of that leading shape): a per-KV-head selection
is shared by the ``h // h_kv`` query heads of its GQA group (query head ``j`` uses KV head
``j // (h // h_kv)``), and the scorer broadcasts it. That is what makes decoding fast: a kernel
reads each selected KV row once per group instead of once per query head (the report's
``kv_density`` counts those rows). Without GQA (``h == h_kv``) the two shapes coincide and a
selection is simply per head.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

import torch

__all__ = [
    "MaskerInput",
    "SparseSelection",
    "Selection",
    "causal_mask",
    "expand_kv",
    "attention_logits",
    "num_causal",
    "budget",
    "top_per_query",
    "per_query_heads",
    "ENTRY_POINT",
    "EVOLVE_START",
    "EVOLVE_END",
]

ENTRY_POINT = "masker"
EVOLVE_START = "# EVOLVE-BLOCK-START"
EVOLVE_END = "# EVOLVE-BLOCK-END"


@dataclass(frozen=True)
class MaskerInput:
    """One attention call, as a masker sees it.

    queries: ``[b, h, q, d]`` post-RoPE queries.
    keys: ``[b, h_kv, k, d]`` post-RoPE keys (GQA: ``h`` is a multiple of ``h_kv``).
    scaling: the softmax scale the model uses (usually ``d ** -0.5``).
    query_positions: ``[q]`` absolute positions; key ``j`` is visible to query ``i`` iff
        ``j <= query_positions[i]``. Keys are indexed by absolute position.
    layer_idx, num_layers: which layer this call belongs to.
    density_target: fraction of causal tokens the run aims to attend to.
    generator: seeded ``torch.Generator`` on the same device as ``queries``; use it for
        every random draw so that scores replicate.
    state: per-(sample, layer) dict that persists across the decode steps of one sample,
        for maskers that keep summaries. Empty on the first call.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    scaling: float
    query_positions: torch.Tensor
    layer_idx: int
    num_layers: int
    density_target: float
    generator: torch.Generator
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def num_heads(self) -> int:
        return self.queries.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def num_keys(self) -> int:
        return self.keys.shape[2]


@dataclass(frozen=True)
class SparseSelection:
    """Sparse form of a selection: per query, a list of key indices and their weights.

    indices: ``[b, h, q, n]`` integer key positions; ``-1`` pads unused slots.
    weights: ``[b, h, q, n]`` estimator weights (``>= 1``) for those slots.
    An index may appear at most once per query.
    """

    indices: torch.Tensor
    weights: torch.Tensor


Selection = Union[torch.Tensor, SparseSelection]


def causal_mask(inp: MaskerInput) -> torch.Tensor:
    """Boolean ``[q, k]`` mask of the keys each query may attend to."""
    k = torch.arange(inp.num_keys, device=inp.keys.device)
    return k[None, :] <= inp.query_positions.to(inp.keys.device)[:, None]


def num_causal(inp: MaskerInput) -> torch.Tensor:
    """``[q]`` count of causal keys per query (position + 1, capped at the key count)."""
    return (inp.query_positions.to(inp.keys.device) + 1).clamp(max=inp.num_keys)


def budget(inp: MaskerInput, fraction: float | None = None) -> torch.Tensor:
    """``[q]`` integer number of tokens per query for a density ``fraction`` (default: the target)."""
    frac = inp.density_target if fraction is None else fraction
    return (num_causal(inp).float() * frac).floor().clamp(min=1).long()


def expand_kv(keys: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Repeat ``[b, h_kv, k, d]`` keys to ``[b, h, k, d]`` for grouped-query attention."""
    groups = num_heads // keys.shape[1]
    return keys if groups == 1 else keys.repeat_interleave(groups, dim=1)


def attention_logits(inp: MaskerInput) -> torch.Tensor:
    """Float32 ``[b, h, q, k]`` scaled scores ``q.k * scaling``, ``-inf`` where not causal.

    Oracle maskers use these; practical ones should avoid computing all of them.
    """
    keys = expand_kv(inp.keys, inp.num_heads).float()
    logits = torch.matmul(inp.queries.float(), keys.transpose(-1, -2)) * inp.scaling
    return logits.masked_fill(~causal_mask(inp), float("-inf"))


def per_query_heads(selection: Selection, num_heads: int, num_kv_heads: int) -> Selection:
    """A per-KV-head selection (leading shape ``[b, h_kv, q]``) repeated for each query head of its
    GQA group, giving ``[b, h, q, ...]``; anything else is returned unchanged (the scorer judges it)."""
    if num_kv_heads == num_heads or num_heads % num_kv_heads != 0:
        return selection
    groups = num_heads // num_kv_heads

    def expand(t: Any) -> Any:
        return t.repeat_interleave(groups, dim=1)

    if type(selection) is SparseSelection:
        idx, w = selection.indices, selection.weights
        if (type(idx) is torch.Tensor and type(w) is torch.Tensor and idx.dim() == 4 and idx.shape == w.shape
                and idx.shape[1] == num_kv_heads):
            return SparseSelection(expand(idx), expand(w))
        return selection
    if type(selection) is torch.Tensor and selection.dim() == 4 and selection.shape[1] == num_kv_heads:
        return expand(selection)
    return selection


def top_per_query(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the ``counts`` highest ``scores`` in each row of ``[..., q, k]``.

    ``counts`` is ``[q]`` (same for every head) or ``scores.shape[:-1]`` (per row).
    ``-inf`` entries are never picked, so passing causally masked scores keeps the result causal.
    """
    order = scores.argsort(dim=-1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return (rank < counts.to(scores.device).unsqueeze(-1)) & torch.isfinite(scores)
