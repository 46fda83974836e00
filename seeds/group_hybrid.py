"""Reference: sinks + window + group top-k + an unbiased sample, shared by each GQA group.

The selection is returned per KV head (``[b, h_kv, q, k]``): every query head of a GQA group
attends to the same keys, so a decode kernel gathers each selected KV row once per group and
its kv_density equals its density, where per-head maskers read up to G times more rows at the
same density. Top-k ranks keys by the group's max over heads of each head's softmax
probability, so every head's heavy hitters compete on one scale; the rest of the budget is a
uniform sample weighted 1/p, which is unbiased for every head of the group.
"""
import torch

from evaluator.contract import MaskerInput, Selection, attention_logits, budget, causal_mask, top_per_query

# EVOLVE-BLOCK-START
SINK_TOKENS = 4
WINDOW_FRACTION = 0.02
TOPK_FRACTION = 0.05
# The rest of the density budget goes to the random sample.


def masker(inp: MaskerInput) -> Selection:
    """Per KV head: sink/window/group-top-k picks (weight 1) plus a shared uniform sample with weight 1/p."""
    total = budget(inp)  # [q]
    k = torch.arange(inp.num_keys, device=inp.keys.device)[None, :]
    pos = inp.query_positions.to(inp.keys.device)[:, None]
    causal = causal_mask(inp)  # [q, k]
    window = budget(inp, WINDOW_FRACTION)[:, None]
    fixed = ((k < SINK_TOKENS) | (k > pos - window)) & causal
    logits = attention_logits(inp)  # [b, h, q, k]
    b, h, q, n = logits.shape
    group = h // inp.num_kv_heads
    probs = torch.softmax(logits, dim=-1).view(b, inp.num_kv_heads, group, q, n)
    score = probs.amax(dim=2).masked_fill(~causal, float("-inf"))  # [b, h_kv, q, k]
    topk = torch.minimum(budget(inp, TOPK_FRACTION), (total - fixed.sum(-1)).clamp(min=0))
    chosen = top_per_query(score.masked_fill(fixed, float("-inf")), topk) | fixed
    rest = causal & ~chosen
    n_rest = rest.sum(-1)  # [b, h_kv, q]
    n_sample = torch.minimum((total - chosen.sum(-1)).clamp(min=0), n_rest)
    noise = torch.rand(score.shape, generator=inp.generator, device=score.device)
    sampled = top_per_query(noise.masked_fill(~rest, float("-inf")), n_sample)
    inclusion = n_sample.float() / n_rest.clamp(min=1).float()  # p of each residual token
    weight = torch.where(inclusion > 0, 1.0 / inclusion.clamp(min=1e-12), torch.zeros_like(inclusion))
    return chosen.float() + sampled.float() * weight[..., None]
# EVOLVE-BLOCK-END
