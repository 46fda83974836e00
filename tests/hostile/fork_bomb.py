"""Hostile: forks without end and spawns sleepers that leave the process group; expect timeout, no survivors."""
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
import subprocess
import time


def masker(inp: MaskerInput):
    for _ in range(20):  # children that escape the process group with a new session
        try:
            subprocess.Popen(["/bin/sleep", "1000"], start_new_session=True)
        except OSError:
            pass
    while True:  # classic fork bomb: every child keeps forking too
        try:
            if os.fork() == 0:
                try:
                    os.setsid()
                except OSError:
                    pass
        except OSError:
            time.sleep(0.01)
# EVOLVE-BLOCK-END
