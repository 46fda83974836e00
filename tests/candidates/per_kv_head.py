"""A dense per-KV-head masker whose KV heads differ and carry weights other than 1 (sessions repeat it per query head)."""
import torch

from evaluator.contract import MaskerInput, budget, causal_mask


def masker(inp: MaskerInput):
    keep = budget(inp)
    k = torch.arange(inp.num_keys, device=inp.keys.device)[None, :]
    sel = ((k < 4) | (k > inp.query_positions[:, None] - keep[:, None])) & causal_mask(inp)
    b, h_kv = inp.keys.shape[:2]
    sel = sel.expand(b, h_kv, -1, -1).float().clone()
    sel[:, 0, :, 1:4] = 0.0  # the KV heads differ: a wrong broadcast would show
    sel[:, 1] *= 2.0  # and carry weights other than 1
    return sel
