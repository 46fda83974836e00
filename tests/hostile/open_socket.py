"""Hostile: connects to a listener on 127.0.0.1; raises if it gets through (expect valid)."""
import torch

from evaluator.contract import MaskerInput, budget, causal_mask


def _valid(inp: MaskerInput) -> torch.Tensor:
    """A correct sink + window selection, returned when the attack is contained."""
    keep = budget(inp)
    k = torch.arange(inp.num_keys, device=inp.keys.device)[None, :]
    pos = inp.query_positions.to(inp.keys.device)[:, None]
    sel = ((k < 4) | (k > pos - keep[:, None])) & causal_mask(inp)
    b, h = inp.queries.shape[:2]
    return sel.float().expand(b, h, -1, -1).contiguous()


# EVOLVE-BLOCK-START
import socket

PORT = 47291  # the test listens here


def masker(inp: MaskerInput):
    try:
        s = socket.create_connection(("127.0.0.1", PORT), timeout=1)
    except OSError:
        return _valid(inp)
    s.sendall(b"exfiltrated")
    raise RuntimeError("connected to 127.0.0.1")
# EVOLVE-BLOCK-END
