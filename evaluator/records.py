"""The unit of fast scoring: one attention call of one sample in one layer."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionRecord:
    """Captured inputs and dense output of one (sample, layer) attention call.

    queries ``[1, h, q, d]``; keys and values ``[1, h_kv, k, d]`` (post-RoPE, keys indexed by
    absolute position); positions ``[q]``; dense_out ``[1, h, q, d]`` float32.
    """

    sample: int
    layer: int
    num_layers: int
    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    scaling: float
    dense_out: torch.Tensor

    def to(self, device: torch.device | str) -> "AttentionRecord":
        """A copy with every tensor on ``device``."""
        return AttentionRecord(
            self.sample, self.layer, self.num_layers,
            self.queries.to(device), self.keys.to(device), self.values.to(device),
            self.positions.to(device), self.scaling, self.dense_out.to(device),
        )

    @property
    def weights_shape(self) -> tuple[int, int, int, int]:
        """Shape of a dense selection for this record: ``[b, h, q, k]``."""
        b, h, q, _ = self.queries.shape
        return (b, h, q, self.keys.shape[2])


def record_seed(base_seed: int, sample: int, layer: int) -> int:
    """Seed of the generator handed to the masker for one record; fixed by the workload."""
    return (base_seed * 1_000_003 + sample * 10_007 + layer) % (2**63 - 1)
