"""Hostile: looks for API keys in its environment and its parent's; raises if it sees any (expect valid)."""
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
import os

NAMES = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "ADRS_LLM_API_KEY", "GITHUB_TOKEN", "AWS_SECRET_ACCESS_KEY",
         "DB_PASSWORD", "ADRS_LLM_BASE_URL", "OPENAI_BASE_URL", "MY_SERVICE_KEY")


def masker(inp: MaskerInput):
    seen = [n for n in NAMES if n in os.environ]
    for pid in (os.getppid(), 1):
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                blob = fh.read()
            seen += [n for n in NAMES if n.encode() + b"=" in blob]
        except OSError:
            pass
    if seen or any("sk-hostile" in v for v in os.environ.values()):
        raise RuntimeError(f"secrets visible: {seen}")
    return _valid(inp)
# EVOLVE-BLOCK-END
