"""Bit packing on the selection's own device, in ``numpy.packbits`` layout (big-endian bits).

Sandbox sessions move a dense selection per masker call; packing where the tensor lives
means only the packed bits cross to the host (1/32 of the float32 weights), and the parent
unpacks straight onto its device. The encoded form is exactly that of
``evaluator.sandbox.transport.encode_selection`` (``nz``, ``ne1``, ``vals``), so either side
may use either implementation.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from evaluator.contract import per_query_heads
from evaluator.sandbox.transport import PLAIN, ProtocolError, _is_float, _tensor_meta, encode_selection

_BITS = (128, 64, 32, 16, 8, 4, 2, 1)


@functools.lru_cache(maxsize=16)
def _bit_weights(device: torch.device) -> torch.Tensor:
    """The bit values on ``device``, made once: a fresh ``torch.tensor`` per call is a blocking
    host-to-device copy, 240 of them per candidate."""
    return torch.tensor(_BITS, dtype=torch.uint8, device=device)


def popcount(packed: torch.Tensor, count: int) -> int:
    """Set bits among the first ``count`` bits of host bytes in ``packbits`` layout (padding bits
    of the last byte ignored, as ``unpackbits(packed, count)`` would): counted on the host, so
    checking a selection's sizes needs no device round trip."""
    a = packed.reshape(-1).contiguous().numpy()
    full = count // 8
    whole = full // 8 * 8
    n = int(np.bitwise_count(a[:whole].view(np.uint64)).sum(dtype=np.int64)) + int(np.bitwise_count(a[whole:full]).sum())
    rest = count - 8 * full
    if rest:
        n += int(np.bitwise_count(np.uint8(a[full] & ((0xFF << (8 - rest)) & 0xFF))))
    return n


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
    return (flat.view(-1, 8) * _bit_weights(flat.device)).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpackbits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of ``packbits``: the first ``count`` bits as a bool tensor."""
    if packed.device.type == "cpu":
        # Same fast path as packbits; view(bool) reinterprets numpy's 0/1 bytes without a copy.
        bits = np.unpackbits(packed.reshape(-1).contiguous().numpy(), count=count)
        return torch.from_numpy(bits).view(torch.bool)
    return _unpackbits_torch(packed, count)


def _unpackbits_torch(packed: torch.Tensor, count: int) -> torch.Tensor:
    """``unpackbits`` with torch ops only (see ``_packbits_torch``)."""
    return ((packed.reshape(-1, 1) & _bit_weights(packed.device)) != 0).reshape(-1)[:count]


def encode_selection_on_device(sel: Any, shape: tuple[int, ...], device: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``encode_selection`` for well-formed dense tensors, packing before leaving the device."""
    if not (type(sel) is torch.Tensor and tuple(sel.shape) == tuple(shape) and str(sel.device) == device
            and (sel.dtype.is_floating_point or sel.dtype == torch.bool)):
        return encode_selection(sel, shape, device)
    meta = {"kind": "dense", **_tensor_meta(sel)}
    nz = sel.detach().reshape(-1)
    if sel.dtype == torch.bool:
        # A bool mask is 0/1 once cast to float32: every selected weight is exactly 1, so ``ne1``
        # is all zero bits and ``vals`` empty; skipping the masked gather gives the same bytes.
        nz_bytes = packbits(nz).cpu()
        return _unit_weights(nz_bytes, nz.numel()), meta
    w = nz.to(torch.float32)
    nz = w != 0  # NaN != 0, so NaN travels as a value and is rejected by the parent
    # The common case, weights all 0 or 1, costs one transfer: the packed mask with a flag byte.
    non_unit = (nz & (w != 1)).any().to(torch.uint8).reshape(1)
    host = torch.cat([packbits(nz), non_unit]).cpu()
    nz_bytes = host[:-1].clone()
    if not bool(host[-1]):
        return _unit_weights(nz_bytes, w.numel()), meta
    vals = w[nz]
    not_one = vals != 1
    tensors = {"nz": nz_bytes, "ne1": packbits(not_one).cpu(), "vals": vals[not_one].cpu().contiguous()}
    return tensors, meta


def _unit_weights(nz_bytes: torch.Tensor, count: int) -> dict[str, torch.Tensor]:
    """The encoding of a selection whose selected weights are all exactly 1."""
    n_sel = popcount(nz_bytes, count)
    return {"nz": nz_bytes, "ne1": torch.zeros((n_sel + 7) // 8, dtype=torch.uint8), "vals": torch.zeros(0, dtype=torch.float32)}


def _kv_shape(shape: tuple[int, ...], num_kv_heads: int) -> tuple[int, ...]:
    """``[b, h_kv, q, k]``: the per-KV-head form of query-head ``shape``."""
    return (shape[0], int(num_kv_heads), *shape[2:])


def encode_for_wire(sel: Any, shape: tuple[int, ...], num_kv_heads: int, device: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """What a worker sends for a masker's selection for query-head ``shape``: a well-formed dense
    per-KV-head tensor ``[b, h_kv, q, k]`` travels as it is (a GQA group's heads share it: 1/G of
    the bytes and of the packing; ``decode_dense_selection`` repeats it for each query head);
    any other per-KV-head selection is repeated here; everything goes through
    ``encode_selection_on_device``."""
    kv = _kv_shape(shape, num_kv_heads)
    if (kv != tuple(shape) and type(sel) is torch.Tensor and tuple(sel.shape) == kv and str(sel.device) == device
            and (sel.dtype.is_floating_point or sel.dtype == torch.bool)):
        return encode_selection_on_device(sel, kv, device)
    return encode_selection_on_device(per_query_heads(sel, shape[1], int(num_kv_heads)), tuple(shape), device)


def decode_dense_selection(meta: dict[str, Any], tensors: dict[str, torch.Tensor], shape: tuple[int, ...],
                           num_kv_heads: int, device: torch.device) -> torch.Tensor | None:
    """Float32 weights ``shape`` from a well-formed dense selection sent at ``shape`` or per KV head
    (then repeated for each query head of its group, as ``plain_weights`` does in process); None
    when the metadata is neither, for the validator's path to word why. ProtocolError if the data
    does not match its metadata."""
    if dense_meta_ok(meta, shape, device):
        return decode_dense_on_device(tensors, shape, device)
    kv = _kv_shape(shape, num_kv_heads)
    if kv != tuple(shape) and dense_meta_ok(meta, kv, device):
        return per_query_heads(decode_dense_on_device(tensors, kv, device), shape[1], int(num_kv_heads))
    return None


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
    # Sizes are checked on the host (popcounts), so decoding never waits for the device.
    n_sel = popcount(nz_bytes, n)
    if ne1_bytes.numel() != (n_sel + 7) // 8:
        raise ProtocolError("dense selection data does not match its metadata")
    n_vals = popcount(ne1_bytes, n_sel)
    if vals.dtype != torch.float32 or vals.dim() != 1 or vals.numel() != n_vals:
        raise ProtocolError("dense selection data does not match its metadata")
    # masked_scatter_/masked_fill_ place values in mask order exactly as boolean index
    # assignment does, without materialising index lists (several times faster on the host).
    dense = torch.zeros(n, dtype=torch.float32, device=device)
    if n_vals == 0:
        dense.masked_fill_(unpackbits(nz_bytes.to(device), n), 1.0)  # every selected weight is exactly 1 (e.g. a bool mask)
    else:
        nz = unpackbits(nz_bytes.to(device), n)
        ne1 = unpackbits(ne1_bytes.to(device), n_sel)
        selected = torch.ones(n_sel, dtype=torch.float32, device=device)
        selected.masked_scatter_(ne1, vals.to(device))
        dense.masked_scatter_(nz, selected)
    return dense.reshape(shape)
