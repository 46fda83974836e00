"""Triton kernels for sparse decode attention (imported lazily by ``sparse_decode``).

Two split-K kernels and one merge kernel:

- ``_split_head``: indices per QUERY head. One program per (batch, query head, chunk); gathers
  ``BLOCK_N`` K rows, scores them with a float32 dot per row, online softmax, gathers the V rows,
  accumulates ``sum p v`` in float32 registers.
- ``_split_group``: indices per KV head, shared by the ``G`` query heads of a GQA group. One
  program per (batch, KV head, chunk); each gathered K/V tile is used by all ``G`` heads through
  ``tl.dot`` (query rows padded to 16). Scores: bf16/fp16 operands, float32 accumulation (exact
  products). ``P @ V``: P is split into a high and a low half in the input dtype and both halves
  are multiplied, so P carries about 16 significant bits instead of 8 (bf16), float32 accumulation.
- ``_merge``: combines the chunks' (max, sum, acc) of each query head and writes the output.

Two variants were measured on an H200 and dropped (benchmarks/results/sparse_decode_h200_sweep.json):
a merge fused into the split kernel (the last program of a row, elected by an atomic counter,
merges the row: 28.1 us instead of 23.9 at 128k / batch 1 / density 0.10, per-KV-head lists,
since that last program merges its group's rows serially after everything else) and a manual
register prefetch of the next K/V tile (29.8-33.2 us instead of 23.9: Triton's own pipelining
with ``num_stages=2`` already overlaps the gathers feeding ``tl.dot``).

Logits are kept in base 2 (``s * scaling * log2(e) + log2(w)``), so ``exp2`` replaces ``exp``.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, Optional

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _split_head(
    Q, K, V, IDX, W, OUT, M_PART, L_PART, ACC_PART,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ib, stride_ih,
    stride_wb, stride_wh,
    stride_ob, stride_oh,
    H, GROUP, T, N, CHUNK, NUM_SPLITS, scale_log2,
    HAS_W: tl.constexpr, NORMALIZE: tl.constexpr, EARLY_V: tl.constexpr, PREFETCH: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:  # launched before the previous kernel ended: wait for its writes, let the merge launch
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d, mask=dmask, other=0.0).to(tl.float32)
    q = q * scale_log2
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    i_base = IDX + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih
    w_base = W + b.to(tl.int64) * stride_wb + h.to(tl.int64) * stride_wh

    start = pid_s * CHUNK
    end = tl.minimum(start + CHUNK, N)
    m_i = tl.zeros([], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    offs_first = start + tl.arange(0, BLOCK_N)
    idx_next = tl.load(i_base + offs_first, mask=offs_first < end, other=-1)
    for n0 in range(start, start + CHUNK, BLOCK_N):  # the last chunk may run past N: masked
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < end
        if PREFETCH:  # indices of this block were loaded during the previous one
            idx = idx_next.to(tl.int64)
        else:
            idx = tl.load(i_base + offs_n, mask=nmask, other=-1).to(tl.int64)
        valid = (idx >= 0) & (idx < T)
        idx = tl.where(valid, idx, 0)
        kv_mask = valid[:, None] & dmask[None, :]
        k = tl.load(k_base + idx[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        if EARLY_V:  # issue the V gather together with K: twice the bytes in flight
            v = tl.load(v_base + idx[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        if PREFETCH:
            offs_nx = offs_n + BLOCK_N
            idx_next = tl.load(i_base + offs_nx, mask=offs_nx < end, other=-1)
        s = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
        if HAS_W:
            w = tl.load(w_base + offs_n, mask=nmask, other=0.0).to(tl.float32)
            valid = valid & (w > 0)
            s = s + tl.log2(tl.where(valid, w, 1.0))
        s = tl.where(valid, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        if not EARLY_V:
            v = tl.load(v_base + idx[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        m_i = m_new

    if NORMALIZE:
        o = tl.where(l_i > 0, acc / tl.where(l_i > 0, l_i, 1.0), 0.0)
        tl.store(OUT + b * stride_ob + h * stride_oh + offs_d, o.to(OUT.dtype.element_ty), mask=dmask)
    else:
        row = pid_bh * NUM_SPLITS + pid_s
        tl.store(M_PART + row, m_i)
        tl.store(L_PART + row, l_i)
        tl.store(ACC_PART + row.to(tl.int64) * BLOCK_D + offs_d, acc)


@triton.jit
def _split_group(
    Q, K, V, IDX, W, OUT, M_PART, L_PART, ACC_PART,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ib, stride_ih,
    stride_wb, stride_wh,
    stride_ob, stride_oh,
    H, H_KV, GROUP, T, N, CHUNK, NUM_SPLITS, scale_log2,
    HAS_W: tl.constexpr, W_PER_HEAD: tl.constexpr, NORMALIZE: tl.constexpr, EARLY_V: tl.constexpr, PREFETCH: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:  # as in _split_head
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid_bk = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bk // H_KV
    hk = pid_bk % H_KV
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    offs_h = tl.arange(0, BLOCK_H)
    hmask = offs_h < GROUP
    heads = hk * GROUP + offs_h
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0)  # [BLOCK_H, BLOCK_D], input dtype
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    i_base = IDX + b.to(tl.int64) * stride_ib + hk.to(tl.int64) * stride_ih

    start = pid_s * CHUNK
    end = tl.minimum(start + CHUNK, N)
    m_i = tl.full([BLOCK_H], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    offs_first = start + tl.arange(0, BLOCK_N)
    idx_next = tl.load(i_base + offs_first, mask=offs_first < end, other=-1)
    for n0 in range(start, start + CHUNK, BLOCK_N):  # the last chunk may run past N: masked
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < end
        if PREFETCH:  # indices of this block were loaded during the previous one
            idx = idx_next.to(tl.int64)
        else:
            idx = tl.load(i_base + offs_n, mask=nmask, other=-1).to(tl.int64)
        valid = (idx >= 0) & (idx < T)
        idx = tl.where(valid, idx, 0)
        kv_mask = valid[:, None] & dmask[None, :]
        k = tl.load(k_base + idx[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        if EARLY_V:
            v = tl.load(v_base + idx[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        if PREFETCH:
            offs_nx = offs_n + BLOCK_N
            idx_next = tl.load(i_base + offs_nx, mask=offs_nx < end, other=-1)
        s = tl.dot(q, tl.trans(k)) * scale_log2  # [BLOCK_H, BLOCK_N] float32
        valid2 = valid[None, :] & hmask[:, None]
        if HAS_W:
            if W_PER_HEAD:
                w = tl.load(W + b * stride_wb + heads[:, None] * stride_wh + offs_n[None, :],
                            mask=hmask[:, None] & nmask[None, :], other=0.0).to(tl.float32)
            else:
                w1 = tl.load(W + b * stride_wb + hk * stride_wh + offs_n, mask=nmask, other=0.0).to(tl.float32)
                w = tl.broadcast_to(w1[None, :], [BLOCK_H, BLOCK_N])
            valid2 = valid2 & (w > 0)
            s = s + tl.log2(tl.where(valid2, w, 1.0))
        s = tl.where(valid2, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if not EARLY_V:
            v = tl.load(v_base + idx[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        p_hi = p.to(v.dtype)
        p_lo = (p - p_hi.to(tl.float32)).to(v.dtype)
        acc = acc * alpha[:, None]
        acc = tl.dot(p_hi, v, acc)
        acc = tl.dot(p_lo, v, acc)
        m_i = m_new

    if NORMALIZE:
        o = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
        tl.store(OUT + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :], o.to(OUT.dtype.element_ty),
                 mask=hmask[:, None] & dmask[None, :])
    else:
        rows = (b * H + heads) * NUM_SPLITS + pid_s
        tl.store(M_PART + rows, m_i, mask=hmask)
        tl.store(L_PART + rows, l_i, mask=hmask)
        tl.store(ACC_PART + rows.to(tl.int64)[:, None] * BLOCK_D + offs_d[None, :], acc, mask=hmask[:, None])


@triton.jit
def _merge_row(OUT_ROW, M_PART, L_PART, ACC_PART, row, NUM_SPLITS,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK_S: tl.constexpr):
    """Combine the NUM_SPLITS chunks (max, sum, acc) of one query-head row and store its output,
    in one pass with a running max (the loads of a chunk of splits are independent)."""
    offs_d = tl.arange(0, BLOCK_D)
    base = row.to(tl.int64) * NUM_SPLITS
    m_run = tl.zeros([], dtype=tl.float32) - float("inf")
    l_run = tl.zeros([], dtype=tl.float32)
    o = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, NUM_SPLITS, CHUNK_S):
        offs_c = s0 + tl.arange(0, CHUNK_S)
        cmask = offs_c < NUM_SPLITS
        mc = tl.load(M_PART + base + offs_c, mask=cmask, other=-float("inf"))
        lc = tl.load(L_PART + base + offs_c, mask=cmask, other=0.0)
        acc = tl.load(ACC_PART + (base + offs_c[:, None]) * BLOCK_D + offs_d[None, :], mask=cmask[:, None], other=0.0)
        m_new = tl.maximum(m_run, tl.max(mc, axis=0))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp2(m_run - m_safe)
        sc = tl.exp2(mc - m_safe)
        l_run = l_run * alpha + tl.sum(lc * sc, axis=0)
        o = o * alpha + tl.sum(acc * sc[:, None], axis=0)
        m_run = m_new
    o = tl.where(l_run > 0, o / tl.where(l_run > 0, l_run, 1.0), 0.0)
    tl.store(OUT_ROW + offs_d, o.to(OUT_ROW.dtype.element_ty), mask=offs_d < HEAD_DIM)


@triton.jit
def _merge(
    OUT, M_PART, L_PART, ACC_PART, stride_ob, stride_oh, H, NUM_SPLITS,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK_S: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:  # started while the split kernel runs: its partials are complete only after the wait
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    _merge_row(OUT + b * stride_ob + h * stride_oh, M_PART, L_PART, ACC_PART, pid, NUM_SPLITS, HEAD_DIM, BLOCK_D, CHUNK_S)


@functools.lru_cache(maxsize=None)
def _properties(index: int) -> Any:
    """The CUDA device's properties, asked of the driver once per device (not on every launch)."""
    return torch.cuda.get_device_properties(index)


def _device_properties(device: torch.device) -> Any:
    return _properties(device.index if device.index is not None else torch.cuda.current_device())


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":  # Triton's interpreter (TRITON_INTERPRET=1) runs on CPU tensors
        return 132
    return _device_properties(device).multi_processor_count


# Launch defaults per kernel, tuned on an H100 at Llama-3.1-8B shapes (128k context, batch 1, density 0.10) and
# confirmed on an H200 at 32k and 128k, batch 1 (benchmarks/bench_sparse_decode.py --tune; benchmarks/results/).
# ``pdl``: programmatic dependent launch (Hopper and later): each kernel may start while the one
# before it in the stream finishes, and waits for its writes in-kernel; ignored where unsupported.
# H200, density 0.10, batch 1 (benchmarks/results/sparse_decode_h200_pdl_*.json): per KV head it
# hides about a microsecond of each call's two launches (32k: 10.6 -> 9.5 us, 128k: 24.4 -> 23.0-23.3);
# per query head it costs 2-3 us (32k: 23.5 -> 25.8-26.5, 128k: 69.0 -> 71.9-72.6), so it is off there.
# At batch 8 it changes neither by more than 1%.
DEFAULTS = {
    "head": dict(block_n=128, num_warps=2, num_stages=1, ctas_per_sm=4, early_v=True, prefetch=True, pdl=False),
    "group": dict(block_n=32, num_warps=4, num_stages=2, ctas_per_sm=4, early_v=True, prefetch=True, pdl=True),
}
# With many rows (batch 8 at Llama-3.1-8B shapes: 256 query-head rows, 64 KV-head rows) fewer, longer
# chunks win: every row already has programs on every SM, and the merge reads fewer partials. H200
# sweep (benchmarks/results/sparse_decode_h200_sweep2.json, density 0.10): per query head 149 -> 124 us
# at 32k and 570 -> 461 us at 128k; per KV head 50 -> 43 us and 194 -> 132 us.
LARGE_ROWS = {"head": 128, "group": 32}
LARGE_DEFAULTS = {"head": dict(ctas_per_sm=2), "group": dict(block_n=64, ctas_per_sm=2)}

# Triton 3.6 was seen to crash in its layout pass (TritonGPURemoveLayoutConversions) on some
# shape specialisations of these kernels with index prefetching on. A launch whose compilation
# fails is retried with the simpler variants below, and the key is remembered.
_FALLBACKS = (dict(prefetch=False), dict(prefetch=False, early_v=False, num_stages=1, pdl=False))
_BAD_KEYS: set = set()


def default_config(rows: int, n: int, group_kernel: bool, device: torch.device, **over) -> dict:
    """Launch configuration: block size, warps, stages, and the number of chunks per row
    (about ``ctas_per_sm`` programs per SM, at least one block of indices per program)."""
    kind = "group" if group_kernel else "head"
    base = dict(DEFAULTS[kind])
    if rows >= LARGE_ROWS[kind]:
        base.update(LARGE_DEFAULTS[kind])
    base.update({k: v for k, v in over.items() if v is not None})
    block_n = int(base["block_n"])
    num_splits = base.get("num_splits")
    if num_splits is None:
        target = int(base["ctas_per_sm"]) * _sm_count(device)
        min_chunk = int(base.get("min_chunk") or block_n)
        num_splits = max(1, min(triton.cdiv(target, max(rows, 1)), triton.cdiv(n, min_chunk)))
    num_splits = max(1, min(int(num_splits), triton.cdiv(max(n, 1), block_n)))
    chunk = triton.cdiv(triton.cdiv(max(n, 1), num_splits), block_n) * block_n
    num_splits = triton.cdiv(max(n, 1), chunk)
    return dict(block_n=block_n, num_warps=int(base["num_warps"]), num_stages=int(base["num_stages"]),
                num_splits=num_splits, chunk=chunk, early_v=bool(base["early_v"]), prefetch=bool(base["prefetch"]),
                pdl=bool(base.get("pdl", False)) and _pdl_supported(device))


def _pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch needs a CUDA device of compute capability 9.0 or later and a
    Triton that exposes it (not the interpreter, which runs on CPU tensors)."""
    if device.type != "cuda" or not hasattr(tl.extra, "cuda") or not hasattr(tl.extra.cuda, "gdc_wait"):
        return False
    return _device_properties(device).major >= 9


def pdl_launch(c: dict) -> dict:
    """The launch option that lets a kernel start before the previous one in its stream ends."""
    return {"launch_pdl": True} if c["pdl"] else {}


def sparse_decode_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, idx: torch.Tensor,
    w: Optional[torch.Tensor], scaling: float, *, out: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16, **tuning,
) -> torch.Tensor:
    """``q [b, h, d]``, caches ``[b, h_kv, T, d]``, ``idx [b, h|h_kv, n]``, ``w`` like idx or
    ``[b, h, n]``: returns ``[b, h, d]``. Shapes are checked by the caller."""
    b, h, d = q.shape
    h_kv, T = k_cache.shape[1], k_cache.shape[2]
    group = h // h_kv
    n = idx.shape[2]
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("k_cache/v_cache need a contiguous last dimension")
    if q.stride(2) != 1:
        q = q.contiguous()
    if idx.stride(2) != 1:
        idx = idx.contiguous()
    if w is not None and w.stride(2) != 1:
        w = w.contiguous()
    if out is None:
        out = torch.empty((b, h, d), device=q.device, dtype=out_dtype)
    elif out.stride(2) != 1:
        raise ValueError("out needs a contiguous last dimension")
    if n == 0:
        out.zero_()
        return out
    group_kernel = group > 1 and idx.shape[1] == h_kv
    if group_kernel and (k_cache.dtype == torch.float32 or tuning.pop("per_head", False)):
        # tl.dot would round float32 operands to tf32: serve the shared list per query head instead.
        heads = torch.arange(h, device=q.device) // group
        idx = idx[:, heads]
        if w is not None and w.shape[1] == h_kv:
            w = w[:, heads]
        group_kernel = False
    rows = b * (h_kv if group_kernel else h)
    cfg = default_config(rows, n, group_kernel, q.device, **tuning)
    splits = cfg["num_splits"]
    block_d = triton.next_power_of_2(d)
    normalize = splits == 1
    if normalize:
        m_part = l_part = acc_part = out  # unused
    else:
        m_part = torch.empty((b * h * splits,), device=q.device, dtype=torch.float32)
        l_part = torch.empty_like(m_part)
        acc_part = torch.empty((b * h * splits, block_d), device=q.device, dtype=torch.float32)
    w_arg = w if w is not None else idx
    sw = (w.stride(0), w.stride(1)) if w is not None else (0, 0)
    scale_log2 = float(scaling) * LOG2E
    common = (
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        idx.stride(0), idx.stride(1), sw[0], sw[1], out.stride(0), out.stride(1),
    )
    grid = (rows, splits)

    def launch(c: dict) -> None:
        if group_kernel:
            _split_group[grid](
                q, k_cache, v_cache, idx, w_arg, out, m_part, l_part, acc_part, *common,
                h, h_kv, group, T, n, c["chunk"], splits, scale_log2,
                HAS_W=w is not None, W_PER_HEAD=(w is not None and w.shape[1] == h and h != h_kv),
                NORMALIZE=normalize, EARLY_V=c["early_v"], PREFETCH=c["prefetch"], HEAD_DIM=d, BLOCK_D=block_d,
                BLOCK_N=c["block_n"], BLOCK_H=max(16, triton.next_power_of_2(group)), USE_PDL=c["pdl"],
                num_warps=c["num_warps"], num_stages=c["num_stages"], **pdl_launch(c),
            )
        else:
            _split_head[grid](
                q, k_cache, v_cache, idx, w_arg, out, m_part, l_part, acc_part, *common,
                h, group, T, n, c["chunk"], splits, scale_log2,
                HAS_W=w is not None, NORMALIZE=normalize, EARLY_V=c["early_v"], PREFETCH=c["prefetch"], HEAD_DIM=d,
                BLOCK_D=block_d, BLOCK_N=c["block_n"], USE_PDL=c["pdl"], num_warps=c["num_warps"],
                num_stages=c["num_stages"], **pdl_launch(c),
            )

    key = (group_kernel, w is not None, None if w is None else w.shape[1], normalize, d, q.dtype, k_cache.dtype,
           idx.dtype, T % 16, n % 16, cfg["chunk"] % 16, tuple(sorted(cfg.items())))
    variants = [cfg] + [{**cfg, **fb} for fb in _FALLBACKS]
    if key in _BAD_KEYS:
        variants = variants[1:]
    launched = cfg
    for i, c in enumerate(variants):
        try:
            launch(c)
            launched = c
            break
        except Exception as e:  # a compiler crash: try the next, simpler variant
            if i == len(variants) - 1:
                raise
            _BAD_KEYS.add(key)
            warnings.warn(f"sparse_decode: Triton failed to compile {c}; retrying a simpler variant ({type(e).__name__})")
    if not normalize:
        _merge[(b * h,)](
            out, m_part, l_part, acc_part, out.stride(0), out.stride(1), h, splits,
            HEAD_DIM=d, BLOCK_D=block_d, CHUNK_S=min(64, max(2, triton.next_power_of_2(splits))), num_warps=4,
            USE_PDL=launched["pdl"], **pdl_launch(launched),
        )
    return out
