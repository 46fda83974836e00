"""Reference: sinks + window + top-k, plus an unbiased random sample of the rest.

The deterministic part captures the heavy hitters; the residual is estimated by sampling
uniformly without replacement, each sampled token weighted 1/p (Horvitz-Thompson), so the
numerator and denominator of softmax are unbiased.
"""
import torch

from evaluator.contract import MaskerInput, Selection, attention_logits, budget, causal_mask, top_per_query

# EVOLVE-BLOCK-START
SINK_TOKENS = 4
WINDOW_FRACTION = 0.02
TOPK_FRACTION = 0.05
# The rest of the density budget goes to the random sample.


def masker(inp: MaskerInput) -> Selection:
    """Deterministic sink/window/top-k picks (weight 1) plus a uniform sample with weight 1/p."""
    total = budget(inp)  # [q]
    k = torch.arange(inp.num_keys, device=inp.keys.device)[None, :]
    pos = inp.query_positions.to(inp.keys.device)[:, None]
    causal = causal_mask(inp)
    window = budget(inp, WINDOW_FRACTION)[:, None]
    fixed = ((k < SINK_TOKENS) | (k > pos - window)) & causal  # [q, k]
    logits = attention_logits(inp)  # [b, h, q, k]
    topk = torch.minimum(budget(inp, TOPK_FRACTION), (total - fixed.sum(-1)).clamp(min=0))
    chosen = top_per_query(logits.masked_fill(fixed, float("-inf")), topk) | fixed
    rest = causal & ~chosen
    n_rest = rest.sum(-1)  # [b, h, q]
    n_sample = torch.minimum((total - chosen.sum(-1)).clamp(min=0), n_rest)
    noise = torch.rand(logits.shape, generator=inp.generator, device=logits.device)
    sampled = top_per_query(noise.masked_fill(~rest, float("-inf")), n_sample)
    inclusion = n_sample.float() / n_rest.clamp(min=1).float()  # p of each residual token
    weight = torch.where(inclusion > 0, 1.0 / inclusion.clamp(min=1e-12), torch.zeros_like(inclusion))
    return chosen.float() + sampled.float() * weight[..., None]
# EVOLVE-BLOCK-END
