"""Decoding SmolLM2 (or any model using transformers' attention registry) with a selector per call.

The model runs with ``use_cache=False`` and an attention function registered through
``AttentionInterface``; that function keeps its own preallocated KV store (one
``[rows, h_kv, max_len, d]`` pair per layer), so decoding does not depend on transformers'
cache classes. Two modes:

* ``prefill``: dense causal SDPA over the context, writing rows ``[:n]`` of the store; the
  context part is then copied to every row group and never written again, so it is computed
  once per spec and shared by every candidate;
* ``select``: every call asks a ``Selector`` for validated float32 weights ``[b, h, q, k]``
  and returns the weighted estimator ``sum w e^s v / sum w e^s``. The dense output of the
  same call (same inputs, all causal keys) is computed alongside to give the per-call
  relative error and density of the fast score, along the sparse trajectory.

Dense reference decoding uses the ``select`` mode too, with all-causal weights, so a
candidate that selects every causal key reproduces it bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from evaluator.contract import expand_kv
from evaluator.scoring import kv_selected


@dataclass(frozen=True)
class CallInputs:
    """One attention call of the decode, as the trusted side sees it (values excluded).

    ``keys`` is a view of the store (absolute positions ``[0, start + q)``); never hand it to a
    candidate without copying. ``new_keys`` are the keys this call appended.
    """

    layer: int
    num_layers: int
    call: int
    queries: torch.Tensor
    keys: torch.Tensor
    new_keys: torch.Tensor
    start: int
    positions: torch.Tensor
    scaling: float


Selector = Callable[[CallInputs], torch.Tensor]


@dataclass
class CallStats:
    """Per-call numbers, kept as device tensors until the end (no sync per call)."""

    layers: list[int] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    errors: list[torch.Tensor] = field(default_factory=list)
    densities: list[torch.Tensor] = field(default_factory=list)
    kv_densities: list[torch.Tensor] = field(default_factory=list)


class KVStore:
    """Preallocated keys and values of every layer: ``[rows, h_kv, max_len, d]`` each."""

    def __init__(self, num_layers: int, rows: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (rows, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def replicate_rows(self, n: int, length: int) -> None:
        """Copy rows ``[:n]`` of positions ``[:length]`` to every later group of ``n`` rows."""
        for store in (self.keys, self.values):
            for t in store:
                for g in range(n, t.shape[0], n):
                    t[g : g + n, :, :length] = t[:n, :, :length]


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[b, h, q, d]`` -> ``[b, h_kv, (h / h_kv) * q, d]``: query heads of a GQA group side by side."""
    b, h, q, d = x.shape
    return x.reshape(b, kv_heads, (h // kv_heads) * q, d)


def estimator_outputs(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, weights: torch.Tensor,
                      positions: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense, sparse) float32 outputs ``[b, h, q, d]`` of one call, sharing one logits product.

    Same estimator as ``evaluator.scoring.sparse_attention`` (``log w`` added to the logits);
    grouped instead of repeating keys per query head, which matters at 8k keys and 16 rows.
    """
    b, h, q, d = queries.shape
    hk, t = keys.shape[1], keys.shape[2]
    logits = torch.matmul(_grouped(queries.float(), hk), keys.float().transpose(-1, -2)) * scaling
    logits = logits.reshape(b, h, q, t)
    causal = torch.arange(t, device=keys.device)[None, :] <= positions[:, None]
    dense_p = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    sparse_p = torch.softmax(logits + torch.log(weights), dim=-1)
    v = values.float()

    def mix(p: torch.Tensor) -> torch.Tensor:
        return torch.matmul(_grouped(p, hk), v).reshape(b, h, q, d)

    return mix(dense_p), mix(sparse_p)


def causal_selector(inputs: CallInputs) -> torch.Tensor:
    """All causal keys with weight 1: dense attention through the same code path."""
    b, h, q, _ = inputs.queries.shape
    t = inputs.keys.shape[2]
    causal = torch.arange(t, device=inputs.keys.device)[None, :] <= inputs.positions[:, None]
    return causal.to(torch.float32).expand(b, h, q, t).contiguous()


class SparseDecoder:
    """Owns the attention function registered on the model and the KV store it writes."""

    def __init__(self, model: Any, rows: int, max_len: int) -> None:
        from evaluator.workload.capture import register_attention

        cfg = model.config
        self.model = model
        self.num_layers = cfg.num_hidden_layers
        self.rows = rows
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.store = KVStore(self.num_layers, rows, cfg.num_key_value_heads, max_len, head_dim, dtype, device)
        self.device = device
        self.mode = "prefill"
        self.start = 0
        self.call = 0
        self.selector: Selector = causal_selector
        self.stats = CallStats()
        name = register_attention(self._attention)
        _register_no_mask(name)
        model.set_attn_implementation(name)

    # ------------------------------------------------------------------ attention function
    def _attention(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: Any, scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        layer = module.layer_idx
        scaling = float(scaling if scaling is not None else module.scaling)
        b, _, q, _ = query.shape
        end = self.start + q
        ks, vs = self.store.keys[layer], self.store.values[layer]
        ks[:b, :, self.start:end] = key
        vs[:b, :, self.start:end] = value
        if self.mode == "prefill":
            h = query.shape[1]
            out = torch.nn.functional.scaled_dot_product_attention(
                query, expand_kv(key, h), expand_kv(value, h), is_causal=True, scale=scaling)
            return out.transpose(1, 2).contiguous(), None
        positions = torch.arange(self.start, end, device=query.device)
        inputs = CallInputs(layer, self.num_layers, self.call, query, ks[:b, :, :end], key, self.start, positions, scaling)
        weights = self.selector(inputs)
        dense, sparse = estimator_outputs(query, ks[:b, :, :end], vs[:b, :, :end], weights, positions, scaling)
        diff = torch.linalg.vector_norm((dense - sparse).double()) / torch.linalg.vector_norm(dense.double())
        causal = (positions.double() + 1).sum() * b
        h, h_kv = query.shape[1], key.shape[1]
        self.stats.layers.append(layer)
        self.stats.calls.append(self.call)
        self.stats.errors.append(diff)
        self.stats.densities.append(weights.ne(0).sum().double() / (causal * h))
        self.stats.kv_densities.append(kv_selected(weights, h_kv).sum().double() / (causal * h_kv))
        if layer == self.num_layers - 1:
            self.call += 1
        return sparse.to(query.dtype).transpose(1, 2).contiguous(), None

    # ------------------------------------------------------------------ forward passes
    def forward(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Run ``ids`` ``[b, q]`` at absolute positions ``start..``; float32 last-position logits ``[b, vocab]``."""
        self.start = start
        positions = torch.arange(start, start + ids.shape[1], device=self.device)
        with torch.inference_mode():
            out = self.model(input_ids=ids.to(self.device), position_ids=positions[None].expand(ids.shape[0], -1),
                             use_cache=False, logits_to_keep=1)
        return out.logits[:, -1].float()

    def prefill(self, context: torch.Tensor) -> None:
        """Dense prefill of ``context`` ``[n, length]`` into rows ``[:n]``, then into every row group."""
        self.mode = "prefill"
        self.forward(context, 0)
        self.store.replicate_rows(context.shape[0], context.shape[1])

    def decode(self, question: torch.Tensor, start: int, steps: int, selector: Selector,
               teacher: torch.Tensor | None) -> "DecodeTrace":
        """Sparse decode of the rows: question chunk at ``start``, then ``steps`` single tokens.

        Rows come in two groups of ``n`` samples: the first group is fed ``teacher`` tokens
        (``[n, steps + 1]``; None: its own greedy tokens), the second its own greedy tokens.
        Returns both groups' logits, as log-probabilities for the teacher group.
        """
        n = question.shape[0]
        self.mode, self.selector, self.call, self.stats = "select", selector, 0, CallStats()
        try:
            ids = question.repeat(self.rows // n, 1)
            logprobs, free_tokens, teacher_tokens = [], [], []
            pos = start
            for step in range(steps + 1):
                logits = self.forward(ids, pos)
                pos += ids.shape[1]
                logprobs.append(torch.log_softmax(logits[:n].double(), dim=-1))
                own = logits.argmax(dim=-1)
                free_tokens.append(own[n:])
                fed = own[:n] if teacher is None else teacher[:, step].to(self.device)
                teacher_tokens.append(fed)
                ids = torch.cat([fed, own[n:]])[:, None]
        finally:
            self.mode, self.selector = "prefill", causal_selector
        return DecodeTrace(torch.stack(logprobs, 1), torch.stack(teacher_tokens, 1), torch.stack(free_tokens, 1), self.stats)


@dataclass(frozen=True)
class DecodeTrace:
    """What one decode produced: teacher-group log-probs ``[n, steps + 1, vocab]`` (float64),
    tokens fed/predicted per step ``[n, steps + 1]`` for both groups, and per-call stats."""

    logprobs: torch.Tensor
    teacher_tokens: torch.Tensor
    free_tokens: torch.Tensor
    stats: CallStats


def _register_no_mask(name: str) -> None:
    """Our attention function builds its own causal mask; skip transformers' (8k x 8k) one."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    def no_mask(*args: Any, **kwargs: Any) -> None:
        return None

    ALL_MASK_ATTENTION_FUNCTIONS.register(name, no_mask)
