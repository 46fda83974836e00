"""Bit packing on the selection's own device, in ``numpy.packbits`` layout (big-endian bits).

Sandbox sessions move a dense selection per masker call; packing where the tensor lives
means only the packed bits cross to the host (1/32 of the float32 weights), and the parent
unpacks straight onto its device. The encoded form is exactly that of
``evaluator.sandbox.transport.encode_selection`` (``nz``, ``ne1``, ``vals``), so either side
may use either implementation.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from evaluator.contract import per_query_heads
from evaluator.sandbox.transport import PLAIN, ProtocolError, _is_float, dense_meta, encode_selection

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
    if not is_dense_tensor(sel, shape, device):
        return encode_selection(sel, shape, device)
    meta = dense_meta(sel)
    nz = sel.detach().reshape(-1)
    if sel.dtype == torch.bool:
        # A bool mask is 0/1 once cast to float32: every selected weight is exactly 1, so ``ne1``
        # is all zero bits and ``vals`` empty; skipping the masked gather gives the same bytes.
        nz_bytes = packbits(nz).cpu()
        return unit_weights(nz_bytes, nz.numel()), meta
    w = nz.to(torch.float32)
    nz = w != 0  # NaN != 0, so NaN travels as a value and is rejected by the parent
    # The common case, weights all 0 or 1, costs one transfer: the packed mask with a flag byte.
    non_unit = (nz & (w != 1)).any().to(torch.uint8).reshape(1)
    host = torch.cat([packbits(nz), non_unit]).cpu()
    nz_bytes = host[:-1].clone()
    if not bool(host[-1]):
        return unit_weights(nz_bytes, w.numel()), meta
    vals = w[nz]
    not_one = vals != 1
    tensors = {"nz": nz_bytes, "ne1": packbits(not_one).cpu(), "vals": vals[not_one].cpu().contiguous()}
    return tensors, meta


def is_dense_tensor(sel: Any, shape: tuple[int, ...], device: str) -> bool:
    """Whether ``sel`` is a plain float or bool tensor of ``shape`` on ``device`` (the fast path's form)."""
    return (type(sel) is torch.Tensor and tuple(sel.shape) == tuple(shape) and str(sel.device) == device
            and (sel.dtype.is_floating_point or sel.dtype == torch.bool))


def unit_weights(nz_bytes: torch.Tensor, count: int) -> dict[str, torch.Tensor]:
    """The encoding of a selection whose selected weights are all exactly 1."""
    n_sel = popcount(nz_bytes, count)
    return {"nz": nz_bytes, "ne1": torch.zeros((n_sel + 7) // 8, dtype=torch.uint8), "vals": torch.zeros(0, dtype=torch.float32)}


def _kv_shape(shape: tuple[int, ...], num_kv_heads: int) -> tuple[int, ...]:
    """``[b, h_kv, q, k]``: the per-KV-head form of query-head ``shape``."""
    return (shape[0], int(num_kv_heads), *shape[2:])


def encode_for_wire(sel: Any, shape: tuple[int, ...], num_kv_heads: int, device: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """What a worker sends for a masker's selection for query-head ``shape`` (see ``wire_form``),
    through ``encode_selection_on_device``."""
    sel, at = wire_form(sel, shape, num_kv_heads, device)
    return encode_selection_on_device(sel, at, device)


def wire_form(sel: Any, shape: tuple[int, ...], num_kv_heads: int, device: str) -> tuple[Any, tuple[int, ...]]:
    """A selection for query-head ``shape`` as it travels, and the shape it travels at: a
    well-formed dense per-KV-head tensor ``[b, h_kv, q, k]`` as it is (a GQA group's heads share
    it: 1/G of the bytes and of the packing; ``decode_dense_selection`` repeats it for each query
    head); anything else repeated for the query heads if it is per KV head."""
    kv = _kv_shape(shape, num_kv_heads)
    if kv != tuple(shape) and is_dense_tensor(sel, kv, device):
        return sel, kv
    return per_query_heads(sel, shape[1], int(num_kv_heads)), tuple(shape)


@dataclass(frozen=True)
class DenseBytes:
    """A well-formed dense selection's wire bytes, sizes checked on the host, not yet on a device."""

    nz: torch.Tensor
    ne1: torch.Tensor
    vals: torch.Tensor
    selected: int  # set bits of ``nz``
    shape: tuple[int, ...]  # as sent: the record's query-head shape, or per KV head
    heads: int  # the record's query heads, to which a per-KV-head selection is repeated

    @property
    def count(self) -> int:
        return math.prod(self.shape)


def dense_selection_bytes(meta: dict[str, Any], tensors: dict[str, torch.Tensor], shape: tuple[int, ...],
                          num_kv_heads: int, device: torch.device) -> DenseBytes | None:
    """The bytes of a well-formed dense selection sent at query-head ``shape`` or per KV head, checked
    against their metadata on the host; None when the metadata is neither, for the validator's path
    to word why. ProtocolError if the data does not match its metadata."""
    sent = dense_shape_sent(meta, shape, num_kv_heads, device)
    return None if sent is None else _checked_bytes(tensors, sent, int(shape[1]))


def dense_shape_sent(meta: dict[str, Any], shape: tuple[int, ...], num_kv_heads: int,
                     device: torch.device) -> tuple[int, ...] | None:
    """The shape a well-formed dense selection for query-head ``shape`` was sent at (that shape, or
    per KV head), per its declared metadata; None when it is neither."""
    if dense_meta_ok(meta, shape, device):
        return tuple(shape)
    kv = _kv_shape(shape, num_kv_heads)
    if kv != tuple(shape) and dense_meta_ok(meta, kv, device):
        return kv
    return None


def decode_dense_selection(meta: dict[str, Any], tensors: dict[str, torch.Tensor], shape: tuple[int, ...],
                           num_kv_heads: int, device: torch.device) -> torch.Tensor | None:
    """Float32 weights ``shape`` from a well-formed dense selection sent at ``shape`` or per KV head
    (then repeated for each query head of its group, as ``plain_weights`` does in process); None
    when the metadata is neither (see ``dense_selection_bytes``)."""
    sent = dense_selection_bytes(meta, tensors, shape, num_kv_heads, device)
    return None if sent is None else decode_dense_batch([sent], device)[0]


def dense_meta_ok(meta: dict[str, Any], shape: tuple[int, ...], device: torch.device) -> bool:
    """True when declared metadata is a well-formed dense selection (else the validator's path explains why not)."""
    dtype = meta.get("dtype")
    return (meta.get("kind") == "dense" and meta.get("type") == PLAIN and tuple(meta.get("shape", ())) == tuple(shape)
            and meta.get("device") == str(device) and (_is_float(dtype) or dtype == "torch.bool"))


def decode_dense_on_device(tensors: dict[str, torch.Tensor], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Float32 weights ``shape`` on ``device`` from ``nz``/``ne1``/``vals``; ProtocolError if malformed."""
    return decode_dense_batch([_checked_bytes(tensors, tuple(shape), int(shape[1]))], device)[0]


def _checked_bytes(tensors: dict[str, torch.Tensor], shape: tuple[int, ...], heads: int) -> DenseBytes:
    """``tensors`` as ``DenseBytes`` of ``shape``; ProtocolError unless their sizes agree. The sizes
    are popcounts on the host, so checking never waits for the device."""
    n = math.prod(int(s) for s in shape)
    nz_bytes, ne1_bytes, vals = tensors.get("nz"), tensors.get("ne1"), tensors.get("vals")
    if nz_bytes is None or ne1_bytes is None or vals is None or nz_bytes.dtype != torch.uint8 \
            or ne1_bytes.dtype != torch.uint8 or nz_bytes.numel() != (n + 7) // 8:
        raise ProtocolError("dense selection data does not match its metadata")
    n_sel = popcount(nz_bytes, n)
    if ne1_bytes.numel() != (n_sel + 7) // 8:
        raise ProtocolError("dense selection data does not match its metadata")
    n_vals = popcount(ne1_bytes, n_sel)
    if vals.dtype != torch.float32 or vals.dim() != 1 or vals.numel() != n_vals:
        raise ProtocolError("dense selection data does not match its metadata")
    return DenseBytes(nz_bytes.reshape(-1), ne1_bytes.reshape(-1), vals, n_sel, shape, heads)


def batchable(a: DenseBytes, b: DenseBytes) -> bool:
    """Whether ``decode_dense_batch`` may decode ``a`` and ``b`` together."""
    return a.shape == b.shape and a.heads == b.heads


def decode_dense_batch(sent: list[DenseBytes], device: torch.device) -> list[torch.Tensor]:
    """Float32 weights on ``device`` (each at its record's query-head shape) for checked selections
    of one shape (``batchable``). On a GPU the whole batch crosses in one copy from pinned memory
    and is unpacked by a few kernels: per record, a pageable copy syncs the stream and the
    unpacking costs about ten launches, which made decoding most of the parent's time per
    candidate. The values equal decoding each record alone."""
    if device.type != "cuda":
        return [_per_query_heads(_decode_host(x), x) for x in sent]
    return decode_stacked(sent, device)


def decode_stacked(sent: list[DenseBytes], device: torch.device) -> list[torch.Tensor]:
    """``decode_dense_batch``'s device path (it runs on the host too, for tests): one staged copy,
    one unpacking of the batch's bits, one repeat for the query heads."""
    first = sent[0]
    n, r = first.count, len(sent)
    nz_len, ne1_lens = first.nz.numel(), [x.ne1.numel() for x in sent]
    n_ne1, n_vals = sum(ne1_lens), sum(x.vals.numel() for x in sent)
    staged = stage_bytes([x.vals.contiguous().view(torch.uint8) for x in sent] + [x.nz for x in sent] + [x.ne1 for x in sent],
                         pin=device.type == "cuda")  # values first: a float32 view needs an offset divisible by 4
    # Pinned source: the copy is queued without waiting for the device, and the caching host
    # allocator keeps the buffer until the copy is done.
    on_device = staged.to(device, non_blocking=True)
    vals, nz_at = on_device[:4 * n_vals].view(torch.float32), 4 * n_vals
    nz = unpackbits(on_device[nz_at:nz_at + r * nz_len], r * nz_len * 8).view(r, nz_len * 8)[:, :n]
    dense = torch.zeros(r, n, dtype=torch.float32, device=device)
    if n_vals == 0:
        dense.masked_fill_(nz, 1.0)  # every selected weight is exactly 1 (e.g. a bool mask)
    else:
        ne1_bits = unpackbits(on_device[nz_at + r * nz_len:], n_ne1 * 8)
        padded = torch.ones(n_ne1 * 8, dtype=torch.float32, device=device)
        padded.masked_scatter_(ne1_bits, vals)
        # Each record's ne1 bits are padded to whole bytes: its selected weights are the first
        # ``selected`` of its own stretch.
        starts = [0]
        for size in ne1_lens[:-1]:
            starts.append(starts[-1] + size * 8)
        dense.masked_scatter_(nz, torch.cat([padded[s:s + x.selected] for s, x in zip(starts, sent)]))
    b, h_sent, q, k = first.shape
    weights = per_query_heads(dense.view(r * b, h_sent, q, k), first.heads, h_sent)
    return list(weights.view(r, b, first.heads, q, k).unbind(0))


def stage_bytes(parts: list[torch.Tensor], pin: bool) -> torch.Tensor:
    """``parts`` (host uint8) end to end in one new buffer, page-locked if ``pin``. numpy copies on
    this thread: in the harness process on an H200 host (16 cores), torch's multi-threaded ``cat``
    into the page-locked buffer took 60-440 ms a chunk, against 0.3-0.7 ms in a quiet process and
    1-4 ms for numpy in the harness (cause not pinned down; threads waking late is the guess)."""
    staged = torch.empty(sum(p.numel() for p in parts), dtype=torch.uint8, pin_memory=pin)
    np.concatenate([p.numpy() for p in parts], out=staged.numpy())
    return staged


def _decode_host(x: DenseBytes) -> torch.Tensor:
    """One record's float32 weights on the host (numpy's bit unpacking; no launches to amortise)."""
    # masked_scatter_/masked_fill_ place values in mask order exactly as boolean index
    # assignment does, without materialising index lists (several times faster on the host).
    dense = torch.zeros(x.count, dtype=torch.float32)
    nz = unpackbits(x.nz, x.count)
    if x.vals.numel() == 0:
        dense.masked_fill_(nz, 1.0)
    else:
        selected = torch.ones(x.selected, dtype=torch.float32)
        selected.masked_scatter_(unpackbits(x.ne1, x.selected), x.vals)
        dense.masked_scatter_(nz, selected)
    return dense.view(x.shape)


def _per_query_heads(weights: torch.Tensor, x: DenseBytes) -> torch.Tensor:
    return per_query_heads(weights, x.heads, x.shape[1])
