"""Hostile: tries to write outside its scratch dir; expect valid and no file written."""
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
from pathlib import Path

import evaluator

REPO = Path(evaluator.__file__).resolve().parents[1]
TARGETS = [REPO / "runs" / "pwned.txt", REPO / "evaluator" / "pwned.py", Path("/tmp/adrs-hostile-target/pwned.txt")]


def masker(inp: MaskerInput):
    for target in TARGETS:
        try:
            target.write_text("pwned")
        except OSError:
            pass
    for shared in Path("/dev/shm").glob("adrs-sandbox-*"):  # the shared inputs file
        try:
            with open(shared, "r+b") as fh:
                fh.write(b"pwned")
        except OSError:
            pass
    return _valid(inp)
# EVOLVE-BLOCK-END
