"""Bit packing on the selection's own device, in ``numpy.packbits`` layout (big-endian bits).

Sandbox sessions move a dense selection per masker call; packing where the tensor lives
means only the packed bits cross to the host (1/32 of the float32 weights), and the parent
unpacks straight onto its device. The encoded form is exactly that of
``evaluator.sandbox.transport.encode_selection`` (``nz``, ``ne1``, ``vals``), so either side
may use either implementation.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from evaluator.sandbox.transport import PLAIN, ProtocolError, _is_float, _tensor_meta, encode_selection

_BITS = (128, 64, 32, 16, 8, 4, 2, 1)


def packbits(mask: torch.Tensor) -> torch.Tensor:
    """Flattened bool ``mask`` -> uint8 bytes, as ``numpy.packbits`` would lay them out."""
    if mask.device.type == "cpu":
        # numpy's packbits is several times faster than the torch formulation on the host.
        return torch.from_numpy(np.packbits(mask.reshape(-1).to(torch.bool).contiguous().numpy()))
    return _packbits_torch(mask)


def _packbits_torch(mask: torch.Tensor) -> torch.Tensor:
    """``packbits`` with torch ops only, so it runs on any device (tests run it on the host too)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor(_BITS, dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpackbits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of ``packbits``: the first ``count`` bits as a bool tensor."""
    if packed.device.type == "cpu":
        # Same fast path as packbits; view(bool) reinterprets numpy's 0/1 bytes without a copy.
        bits = np.unpackbits(packed.reshape(-1).contiguous().numpy(), count=count)
        return torch.from_numpy(bits).view(torch.bool)
    return _unpackbits_torch(packed, count)


def _unpackbits_torch(packed: torch.Tensor, count: int) -> torch.Tensor:
    """``unpackbits`` with torch ops only (see ``_packbits_torch``)."""
    weights = torch.tensor(_BITS, dtype=torch.uint8, device=packed.device)
    return ((packed.reshape(-1, 1) & weights) != 0).reshape(-1)[:count]


def encode_selection_on_device(sel: Any, shape: tuple[int, ...], device: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``encode_selection`` for well-formed dense tensors, packing before leaving the device."""
    if not (type(sel) is torch.Tensor and tuple(sel.shape) == tuple(shape) and str(sel.device) == device
            and (sel.dtype.is_floating_point or sel.dtype == torch.bool)):
        return encode_selection(sel, shape, device)
    meta = {"kind": "dense", **_tensor_meta(sel)}
    if sel.dtype == torch.bool:
        # A bool mask is 0/1 once cast to float32: every selected weight is exactly 1, so ``ne1``
        # is all zero bits and ``vals`` empty; skipping the masked gather gives the same bytes.
        nz = sel.detach().reshape(-1)
        n_sel = int(nz.sum())
        tensors = {"nz": packbits(nz).cpu(), "ne1": torch.zeros((n_sel + 7) // 8, dtype=torch.uint8),
                   "vals": torch.zeros(0, dtype=torch.float32)}
        return tensors, meta
    w = sel.detach().to(torch.float32).reshape(-1)
    nz = w != 0  # NaN != 0, so NaN travels as a value and is rejected by the parent
    vals = w[nz]
    not_one = vals != 1
    tensors = {"nz": packbits(nz).cpu(), "ne1": packbits(not_one).cpu(), "vals": vals[not_one].cpu().contiguous()}
    return tensors, meta


def dense_meta_ok(meta: dict[str, Any], shape: tuple[int, ...], device: torch.device) -> bool:
    """True when declared metadata is a well-formed dense selection (else the validator's path explains why not)."""
    dtype = meta.get("dtype")
    return (meta.get("kind") == "dense" and meta.get("type") == PLAIN and tuple(meta.get("shape", ())) == tuple(shape)
            and meta.get("device") == str(device) and (_is_float(dtype) or dtype == "torch.bool"))


def decode_dense_on_device(tensors: dict[str, torch.Tensor], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Float32 weights ``shape`` on ``device`` from ``nz``/``ne1``/``vals``; ProtocolError if malformed."""
    n = 1
    for s in shape:
        n *= int(s)
    nz_bytes, ne1_bytes, vals = tensors.get("nz"), tensors.get("ne1"), tensors.get("vals")
    if nz_bytes is None or ne1_bytes is None or vals is None or nz_bytes.dtype != torch.uint8 \
            or ne1_bytes.dtype != torch.uint8 or nz_bytes.numel() != (n + 7) // 8:
        raise ProtocolError("dense selection data does not match its metadata")
    nz = unpackbits(nz_bytes.to(device), n)
    n_sel = int(nz.sum())
    if ne1_bytes.numel() != (n_sel + 7) // 8:
        raise ProtocolError("dense selection data does not match its metadata")
    ne1 = unpackbits(ne1_bytes.to(device), n_sel)
    if vals.dtype != torch.float32 or vals.dim() != 1 or vals.numel() != int(ne1.sum()):
        raise ProtocolError("dense selection data does not match its metadata")
    # masked_scatter_/masked_fill_ place values in mask order exactly as boolean index
    # assignment does, without materialising index lists (several times faster on the host).
    dense = torch.zeros(n, dtype=torch.float32, device=device)
    if vals.numel() == 0:
        dense.masked_fill_(nz, 1.0)  # every selected weight is exactly 1 (e.g. a bool mask)
    else:
        selected = torch.ones(n_sel, dtype=torch.float32, device=device)
        selected.masked_scatter_(ne1, vals.to(device))
        dense.masked_scatter_(nz, selected)
    return dense.reshape(shape)
