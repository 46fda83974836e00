"""Hostile: its error text holds terminal escape sequences and rich markup; expect exception, shown inert."""
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
import sys


def masker(inp: MaskerInput):
    print("\x1b]0;pwned-title\x07\x1b[2J[bold red]PRINTED-MARKUP[/bold red]")
    sys.stdout.flush()
    raise RuntimeError("\x1b[31mRED\x1b[0m [link=file:///etc/passwd]click[/link] [bold]MARKUP[/bold]\x07")
# EVOLVE-BLOCK-END
