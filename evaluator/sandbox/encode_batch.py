"""The worker's side of the fast score on a GPU: the selections of consecutive records encoded together.

Encoding one record's selection is about twenty small tensor operations and a wait for the
device; for ``default``'s shapes on an H200 that cost more than the seeds' own maskers. Here a
worker copies each well-formed dense selection into a slot of one device buffer as the masker
returns it, and encodes a batch of them with the operations of one record and one wait. Each
record still travels as its own message, in exactly the bytes ``devicepack.encode_for_wire``
would give it, so the parent cannot tell the difference.

The copy is also what makes the batch safe: a masker may reuse the tensor it returned for the
next record, so nothing is read from it after the masker's next call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from evaluator.sandbox.devicepack import is_dense_tensor, packbits, unit_weights, wire_form
from evaluator.sandbox.transport import dense_meta

Encoded = tuple[dict[str, torch.Tensor], dict[str, Any]]


@dataclass
class EncodeBatch:
    """Dense selections of one wire shape waiting to be encoded, at most ``capacity`` of them."""

    device: str
    capacity: int = 8
    _buffer: torch.Tensor | None = None
    _shape: tuple[int, ...] | None = None
    _metas: list[dict[str, Any]] = field(default_factory=list)

    def add(self, sel: Any, shape: tuple[int, ...], num_kv_heads: int) -> bool:
        """Copy a masker's selection for query-head ``shape`` into the batch; False (nothing taken)
        if it cannot join: not a dense tensor on the device, a size that does not fill whole
        bytes, or another shape than the batch's. The caller then encodes it alone, after
        sending what the batch holds."""
        sel, at = wire_form(sel, shape, num_kv_heads, self.device)
        count = math.prod(at)
        if not is_dense_tensor(sel, at, self.device) or count % 8 or (self._metas and at != self._shape):
            return False
        if self._buffer is None or self._shape != at:
            self._buffer = torch.empty(self.capacity, count, dtype=torch.float32, device=self.device)
            self._shape = at
        # A float32 copy, as the one-record encoder casts: bool to 0/1, half exactly.
        self._buffer[len(self._metas)].view(at).copy_(sel.detach())
        self._metas.append(dense_meta(sel))
        return True

    def full(self) -> bool:
        return len(self._metas) == self.capacity

    def __len__(self) -> int:
        return len(self._metas)

    def drain(self) -> list[Encoded]:
        """Encode and empty the batch: each record's tensors and metadata, in the order added."""
        metas, self._metas = self._metas, []
        if not metas:
            return []
        assert self._buffer is not None and self._shape is not None
        return encode_rows(self._buffer[:len(metas)], metas)


def encode_rows(w: torch.Tensor, metas: list[dict[str, Any]]) -> list[Encoded]:
    """``devicepack.encode_selection_on_device`` for each row of float32 ``w`` ``[m, n]``
    (``n`` a multiple of 8, so each row's bits are whole bytes of the packed batch)."""
    m, n = w.shape
    nz = w != 0  # NaN != 0, so NaN travels as a value and is rejected by the parent
    ne1 = nz & (w != 1)
    # One transfer for the common case: every row's packed mask, then a flag per row.
    host = torch.cat([packbits(nz), ne1.any(dim=1).to(torch.uint8)]).cpu()
    per_row = n // 8
    weighted = [r for r in range(m) if host[m * per_row + r]]
    values = _weighted_rows(w, nz, ne1, weighted) if weighted else {}
    out = []
    for r, meta in enumerate(metas):
        nz_bytes = host[r * per_row:(r + 1) * per_row].clone()
        out.append(({"nz": nz_bytes, **values[r]} if r in values else unit_weights(nz_bytes, n), meta))
    return out


def _weighted_rows(w: torch.Tensor, nz: torch.Tensor, ne1: torch.Tensor, rows: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """``ne1`` and ``vals`` of the rows whose selected weights are not all 1, gathered for all of
    them at once: row-major boolean indexing keeps each row's values in order, one row after
    another, and the per-row counts say where each ends."""
    index = torch.tensor(rows, device=w.device)
    nz, ne1, w = nz[index], ne1[index], w[index]
    counts = torch.stack([nz.sum(dim=1), ne1.sum(dim=1)]).cpu().tolist()
    not_one = ne1[nz].cpu().numpy()  # over each row's selected weights, as the one-record encoder's ``vals != 1``
    vals = w[ne1].cpu()
    out: dict[int, dict[str, torch.Tensor]] = {}
    a = b = 0
    for r, n_sel, n_vals in zip(rows, counts[0], counts[1]):
        out[r] = {"ne1": torch.from_numpy(np.packbits(not_one[a:a + n_sel])), "vals": vals[b:b + n_vals].clone()}
        a, b = a + n_sel, b + n_vals
    return out


def warm_batch_encoder(device: str, shape: tuple[int, ...], num_kv_heads: int) -> None:
    """A spare's rehearsal of both kinds of row (unit and weighted) at query-head ``shape``, so the
    kernels load before a candidate's clock starts (see ``evaluator.sandbox.warmup``)."""
    count = math.prod(shape)
    mask = (torch.arange(count, device=device) % 3 == 0).reshape(shape)
    weighted = mask.float()
    weighted.view(-1)[0] = 2.0
    batch = EncodeBatch(device, capacity=2)
    if batch.add(mask, shape, num_kv_heads) and batch.add(weighted, shape, num_kv_heads):
        batch.drain()
