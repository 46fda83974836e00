"""CPU threads for an evaluation: where the host does the work, all of them; where a GPU does, few.

Measured on a 2 x H200 host with 32 cores (``benchmarks/profile_fast_score.py --interference``):
a sandboxed fast score of sink_window on ``default``'s shapes took 0.42 s alone and 1.04 s while
one other process imported torch, with torch's default 32 intra-op threads; with 2 threads it
took 0.24 s and 0.27 s. On a GPU the host only launches kernels and moves a few hundred KB per
record, but each parallel CPU operation (a copy, a clone) waits for the slowest of its 32
threads, and a neighbour holding one core makes that a scheduler time slice every time.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

CUDA_HOST_THREADS = 2


def evaluation_threads(device: torch.device | str) -> int:
    """Intra-op threads for a candidate evaluated on ``device`` (in process and in the sandbox
    alike, so that a masker's CPU arithmetic gives the same floats in both)."""
    if torch.device(device).type == "cuda":
        return min(torch.get_num_threads(), CUDA_HOST_THREADS)
    return torch.get_num_threads()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads, then restore the count (it is process-wide)."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
