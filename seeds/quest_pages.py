"""Reference, practical (no oracle scores): Quest-style page selection.

Keys are grouped in pages; each page keeps the element-wise min and max of its keys. The
upper bound of q.k over a page is sum_d max(q_d * min_d, q_d * max_d); the pages with the
largest bounds are attended in full, plus the sink page and the query's own page. Cost is
one bound per page instead of one score per token.
"""
import torch

from evaluator.contract import MaskerInput, Selection, budget, causal_mask, expand_kv

# EVOLVE-BLOCK-START
PAGE_SIZE = 16


def masker(inp: MaskerInput) -> Selection:
    """Top pages by the Quest upper bound, sized so the tokens stay within the density budget."""
    b, h, q, d = inp.queries.shape
    n_keys = inp.num_keys
    n_pages = (n_keys + PAGE_SIZE - 1) // PAGE_SIZE
    pad = n_pages * PAGE_SIZE - n_keys
    keys = expand_kv(inp.keys, h).float()
    padded = torch.nn.functional.pad(keys, (0, 0, 0, pad), value=float("nan"))
    pages = padded.view(b, h, n_pages, PAGE_SIZE, d)
    kmin = torch.nan_to_num(pages.nan_to_num(float("inf")).amin(3), posinf=0.0)
    kmax = torch.nan_to_num(pages.nan_to_num(float("-inf")).amax(3), neginf=0.0)
    qf = inp.queries.float()[:, :, :, None, :]  # [b, h, q, 1, d]
    bound = torch.maximum(qf * kmin[:, :, None], qf * kmax[:, :, None]).sum(-1)  # [b, h, q, P]
    pos = inp.query_positions.to(inp.keys.device)
    page_start = torch.arange(n_pages, device=inp.keys.device) * PAGE_SIZE
    own_page = pos // PAGE_SIZE
    bound = bound.masked_fill(page_start[None, :] > pos[:, None], float("-inf"))
    forced = (torch.arange(n_pages, device=inp.keys.device)[None, :] == own_page[:, None])
    forced[:, 0] = True
    bound = bound.masked_fill(forced, float("inf"))
    n_take = (budget(inp) // PAGE_SIZE).clamp(min=1)  # whole pages within the budget
    order = bound.argsort(-1, descending=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n_pages, device=order.device).expand_as(order))
    take = rank < n_take[:, None]
    tokens = take.repeat_interleave(PAGE_SIZE, dim=-1)[..., :n_keys] & causal_mask(inp)
    return tokens.float()
# EVOLVE-BLOCK-END
