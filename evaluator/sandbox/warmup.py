"""A warm spare's rehearsal: trusted code that runs, before any candidate, the GPU kernels most
maskers and the result encoder will need.

CUDA loads each kernel the first time it runs (lazy module loading), and a fresh worker has
run none: measured on an H200, a fresh process's first pass over ``default``'s records took
0.07-0.39 s against 0.03-0.18 s for its second (sink_window, oracle_topk, vattention). The
spare does that loading while no candidate waits, on the record shapes the candidate will see.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from evaluator.records import AttentionRecord


def warm_encoder(encode: Callable[..., Any], save: Callable[..., bytes], device: str,
                 shape: tuple[int, ...] = (1, 1, 2, 4)) -> None:
    """Run every branch of the selection encoder (bool, unit and weighted floats) at ``shape``."""
    n = 1
    for s in shape:
        n *= s
    mask = (torch.arange(n, device=device) % 3 == 0).reshape(shape)
    weighted = mask.float()
    weighted.view(-1)[0] = 2.0
    for sel in (weighted, mask.float(), mask):
        encoded, _ = encode(sel, shape, device)
        save(encoded)


def warm_masker_ops(rec: AttentionRecord) -> None:
    """The tensor operations seeds and typical LLM-written maskers use, once, at ``rec``'s shapes
    and dtype: attention logits (GQA expanded), softmax, top-k, sort, scatter, gather, cumsum,
    sampling and the usual elementwise and reduction kernels."""
    q, k = rec.queries, rec.keys
    b, h, nq, _ = q.shape
    group = max(1, h // k.shape[1])
    kk = k.repeat_interleave(group, dim=1) if group > 1 else k
    logits = torch.matmul(q, kk.transpose(-1, -2)) * rec.scaling
    causal = torch.arange(kk.shape[2], device=q.device)[None, :] <= rec.positions[:, None]
    logits = logits.masked_fill(~causal, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    budget = max(1, kk.shape[2] // 10)
    top = logits.topk(budget, dim=-1)
    order = probs.sort(dim=-1, descending=True)
    mask = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, top.indices, True)
    weights = torch.zeros_like(probs).scatter(-1, order.indices[..., :budget], 1.0)
    gathered = probs.gather(-1, top.indices)
    csum = order.values.cumsum(dim=-1)
    keep = (csum <= 0.9) | mask.gather(-1, order.indices)
    gen = torch.Generator(device=q.device).manual_seed(0)
    sampled = torch.rand(probs.shape, generator=gen, device=q.device) < probs * 2
    picks = torch.multinomial(probs.reshape(-1, probs.shape[-1])[:4].nan_to_num(0.0) + 1e-6, 4, generator=gen)
    pooled = k.reshape(k.shape[0], k.shape[1], -1, 16, k.shape[-1])[..., 0, :] if k.shape[2] % 16 == 0 else k
    scores = torch.einsum("bhqd,bhkd->bhqk", q[:, :1], pooled[:, :1])
    stats = (logits.amax(dim=-1), logits.mean(dim=-1), probs.max(dim=-1).values, torch.exp(logits - logits.amax(-1, keepdim=True)),
             torch.where(mask, weights, 0.0).sum(), (weights / probs.clamp_min(1e-9)).log1p(), gathered.norm(dim=-1),
             keep.any(dim=-1), sampled.float().argmax(dim=-1), picks.sum(), scores.abs().argsort(dim=-1), torch.nonzero(mask[..., :8]))
    expanded = mask.any(dim=1, keepdim=True).expand(b, h, nq, -1).float()
    (expanded.sum() + sum(s.float().sum() for s in stats)).item()
