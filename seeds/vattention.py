"""Reference: vAttention-style hybrid. Deterministic heavy hitters plus a random sample of the
residual whose size is chosen to meet an (epsilon, delta) bound on the softmax denominator.

With the residual sum estimated as N_rest * mean(e^s) from n uniform samples, the CLT gives
relative error <= EPSILON with probability 1 - DELTA when
n >= (z_{1-DELTA/2} * N_rest * std(e^s) / (EPSILON * D))^2, D the full denominator.
This reference takes those statistics from exact scores; a practical version would estimate
them from a small pilot sample.
"""
import math

import torch

from evaluator.contract import MaskerInput, Selection, attention_logits, budget, causal_mask, top_per_query

# EVOLVE-BLOCK-START
SINK_TOKENS = 4
WINDOW_FRACTION = 0.02
TOPK_FRACTION = 0.04
EPSILON = 0.05
DELTA = 0.05


def masker(inp: MaskerInput) -> Selection:
    """Sink + window + top-k (weight 1), then a residual sample sized by the (eps, delta) bound."""
    total = budget(inp)
    k = torch.arange(inp.num_keys, device=inp.keys.device)[None, :]
    pos = inp.query_positions.to(inp.keys.device)[:, None]
    causal = causal_mask(inp)
    fixed = ((k < SINK_TOKENS) | (k > pos - budget(inp, WINDOW_FRACTION)[:, None])) & causal
    logits = attention_logits(inp)
    topk = torch.minimum(budget(inp, TOPK_FRACTION), (total - fixed.sum(-1)).clamp(min=0))
    chosen = top_per_query(logits.masked_fill(fixed, float("-inf")), topk) | fixed
    rest = causal & ~chosen
    n_rest = rest.sum(-1).float()  # [b, h, q]
    # Exponentials relative to the row max: the ratio in the bound is scale-free.
    e = torch.exp(logits - logits.amax(-1, keepdim=True)).masked_fill(~causal, 0.0)
    denominator = e.sum(-1)
    rest_e = e * rest
    mean = rest_e.sum(-1) / n_rest.clamp(min=1)
    var = ((rest_e - mean[..., None]) ** 2 * rest).sum(-1) / n_rest.clamp(min=1)
    z = math.sqrt(2.0) * torch.special.erfinv(torch.tensor(1.0 - DELTA)).item()
    needed = torch.ceil((z * n_rest * var.sqrt() / (EPSILON * denominator)) ** 2)
    room = (total - chosen.sum(-1)).clamp(min=0).float()
    n_sample = torch.minimum(torch.minimum(needed, room), n_rest).long()
    noise = torch.rand(logits.shape, generator=inp.generator, device=logits.device)
    sampled = top_per_query(noise.masked_fill(~rest, float("-inf")), n_sample)
    inclusion = n_sample.float() / n_rest.clamp(min=1)
    weight = torch.where(inclusion > 0, 1.0 / inclusion.clamp(min=1e-12), torch.zeros_like(inclusion))
    return chosen.float() + sampled.float() * weight[..., None]
# EVOLVE-BLOCK-END
