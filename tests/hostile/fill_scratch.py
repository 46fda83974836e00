"""Hostile: writes to cwd, /tmp and /dev/shm until the disk is full; expect valid within the cap."""
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

TARGETS = {}  # filled in by the test


def masker(inp: MaskerInput):
    if inp.layer_idx != 0:
        return _valid(inp)
    chunk = b"x" * (1 << 20)
    written, files = 0, []
    for folder in (".", "/tmp", "/dev/shm"):
        path = os.path.join(folder, "fill.bin")
        try:
            with open(path, "wb") as fh:
                files.append(path)
                while written < TARGETS["give_up_bytes"]:
                    fh.write(chunk)
                    fh.flush()
                    written += len(chunk)
        except OSError:
            pass
    for path in files:
        try:
            os.remove(path)
        except OSError:
            pass
    if written >= TARGETS["give_up_bytes"]:
        raise RuntimeError(f"BREACH: wrote {written} bytes without hitting a cap")
    return _valid(inp)
# EVOLVE-BLOCK-END
