"""Sparse decode attention: the PyTorch path (always) and the Triton kernel (GPU only) against
a float64 reference computed by a different route (dense scattered weights)."""
from __future__ import annotations

import math
import zlib

import pytest
import torch

from evaluator.kernels import sparse_decode, sparse_decode_reference, sparse_decode_torch, triton_available


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double().cpu()
    ref = ref.double().cpu()
    assert torch.isfinite(out).all(), "non-finite output"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def make_case(b=2, h=8, h_kv=2, T=300, d=64, n=40, layout="head", weights="kv", dtype=torch.float32,
              device="cpu", seed=0, pad=True, slack=0):
    """Random decode inputs. layout: 'head' -> indices [b, h, n]; 'group' -> [b, h_kv, n].
    weights: None, 'same' (like indices) or 'head' ([b, h, n], only with layout 'group').
    slack > 0 makes the caches slices of a longer buffer (non-contiguous strides)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, d, generator=g) * 2
    kbuf = torch.randn(b, h_kv, T + slack, d, generator=g)
    vbuf = torch.randn(b, h_kv, T + slack, d, generator=g)
    rows = h if layout == "head" else h_kv
    idx = torch.stack([torch.randperm(T, generator=g)[:n] for _ in range(b * rows)]).view(b, rows, n)
    if pad:  # pad some slots with -1
        idx = torch.where(torch.rand(idx.shape, generator=g) < 0.2, torch.full_like(idx, -1), idx)
    w = None
    if weights == "same":
        w = 1.0 / torch.rand(idx.shape, generator=g).clamp_min(0.05)
    elif weights == "head":
        assert layout == "group"
        w = 1.0 / torch.rand(b, h, n, generator=g).clamp_min(0.05)
        w = torch.where(torch.rand(w.shape, generator=g) < 0.3, torch.zeros_like(w), w)  # head drops a slot
    q, kbuf, vbuf = (x.to(device=device, dtype=dtype) for x in (q, kbuf, vbuf))
    k, v = kbuf[:, :, :T], vbuf[:, :, :T]
    idx = idx.to(device)
    if w is not None:
        w = w.to(device)
    return q, k, v, idx, w


CASES = [
    dict(layout="head", weights=None),
    dict(layout="head", weights="same"),
    dict(layout="group", weights=None),
    dict(layout="group", weights="same"),
    dict(layout="group", weights="head"),
    dict(h=4, h_kv=4, layout="head", weights="same"),  # no GQA
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['layout']}-{c['weights']}-h{c.get('h', 8)}")
def test_torch_path_matches_float64_reference(case):
    q, k, v, idx, w = make_case(seed=zlib.crc32(str(case).encode()) % 1000, **case)
    scaling = 1 / math.sqrt(q.shape[-1])
    ref = sparse_decode_reference(q, k, v, idx, w, scaling)
    out = sparse_decode_torch(q, k, v, idx, w, scaling)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref) < 1e-5
    # the dispatcher takes the torch path on CPU
    assert rel_err(sparse_decode(q, k, v, idx, w, scaling), ref) < 1e-5


def test_reference_agrees_with_scorer():
    """The kernel's estimator is the scorer's: compare with evaluator.scoring.sparse_attention."""
    from evaluator.scoring import sparse_attention

    b, h, h_kv, T, d = 1, 6, 3, 50, 16
    q, k, v, idx, w = make_case(b=b, h=h, h_kv=h_kv, T=T, d=d, n=12, layout="head", weights="same", pad=False)
    dense = torch.zeros(b, h, T, dtype=torch.float64)
    dense.scatter_add_(2, idx, w.double())
    scorer = sparse_attention(q[:, :, None], k, v, dense[:, :, None], 0.3, dtype=torch.float64)[:, :, 0]
    assert rel_err(sparse_decode_reference(q, k, v, idx, w, 0.3), scorer) < 1e-12


def test_torch_path_edge_cases():
    q, k, v, idx, w = make_case(layout="head", weights="same", pad=False)
    idx[0, 1] = -1  # a row with nothing selected gives zeros, not NaN
    idx[1, 2, :5] = idx[1, 2, 5]  # duplicates count once per slot
    w[1, 3] = 0.0  # weight 0 = not attended
    ref = sparse_decode_reference(q, k, v, idx, w)
    out = sparse_decode_torch(q, k, v, idx, w)
    assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1]))
    assert torch.equal(out[1, 3], torch.zeros_like(out[1, 3]))
    assert rel_err(out, ref) < 1e-5
    # 4-d query / index forms ([b, h, 1, d], [b, h, 1, n]) keep the query axis
    out4 = sparse_decode_torch(q[:, :, None], k, v, idx[:, :, None], w[:, :, None])
    assert out4.shape == (q.shape[0], q.shape[1], 1, q.shape[2])
    assert torch.allclose(out4[:, :, 0], out)
    # extreme weights (1/p with tiny p) do not overflow
    out_big = sparse_decode_torch(q, k, v, idx, w * 1e30)
    assert torch.isfinite(out_big).all()


def test_torch_path_low_precision_inputs():
    q, k, v, idx, w = make_case(layout="group", weights="head", dtype=torch.bfloat16)
    ref = sparse_decode_reference(q, k, v, idx, w)
    assert rel_err(sparse_decode_torch(q, k, v, idx, w, out_dtype=torch.float32), ref) < 1e-5
    assert rel_err(sparse_decode_torch(q, k, v, idx, w), ref) < 1e-2


def test_shape_errors():
    q, k, v, idx, w = make_case()
    with pytest.raises(ValueError):
        sparse_decode_torch(q, k, v, idx[:, :3], None)
    with pytest.raises(ValueError):
        sparse_decode_torch(q, k, v, idx.float(), None)
    with pytest.raises(ValueError):
        sparse_decode(q, k, v, idx, w, backend="nope")


needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() and triton_available()), reason="needs CUDA and triton"
)

GPU_CASES = [
    dict(layout="head", weights=None),
    dict(layout="head", weights="same"),
    dict(layout="group", weights=None),
    dict(layout="group", weights="same"),
    dict(layout="group", weights="head"),
    dict(h=4, h_kv=4, layout="head", weights="same"),
    dict(h=32, h_kv=8, d=128, T=5000, n=1500, layout="head", weights="same"),
    dict(h=32, h_kv=8, d=128, T=5000, n=1500, layout="group", weights="head"),
    dict(h=28, h_kv=4, d=128, T=3000, n=333, layout="group", weights="same"),  # G = 7
    dict(h=9, h_kv=3, d=64, T=800, n=100, layout="group", weights="same"),  # SmolLM2 shape
]


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("splits", [None, 1, 7], ids=["auto", "s1", "s7"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c['layout']}-{c['weights']}-h{c.get('h', 8)}-n{c.get('n', 40)}")
def test_triton_matches_float64_reference(case, splits, dtype):
    seed = (zlib.crc32(str(case).encode()) + (splits or 0) * 7919 + (dtype == torch.float16)) % 100000
    q, k, v, idx, w = make_case(device="cuda", dtype=dtype, seed=seed, slack=17, **case)
    assert not k.is_contiguous()
    scaling = 1 / math.sqrt(q.shape[-1])
    ref = sparse_decode_reference(q.cpu(), k.cpu(), v.cpu(), idx.cpu(), None if w is None else w.cpu(), scaling)
    tuning = {} if splits is None else {"num_splits": splits}
    out32 = torch.full(q.shape, float("nan"), device="cuda", dtype=torch.float32)  # poisoned
    sparse_decode(q, k, v, idx, w, scaling, out=out32, backend="triton", **tuning)
    torch.cuda.synchronize()
    assert rel_err(out32, ref) < 1e-4  # fp32 output: only the kernel's arithmetic
    out = sparse_decode(q, k, v, idx, w, scaling, backend="triton", **tuning)
    assert out.dtype == dtype
    assert rel_err(out, ref) < 1e-2  # output rounded to bf16/fp16
    # int32 indices and the [b, h, 1, d] form give the same answer
    out4 = sparse_decode(q[:, :, None], k, v, idx.int()[:, :, None], None if w is None else w[:, :, None],
                         scaling, backend="triton", out_dtype=torch.float32, **tuning)
    assert rel_err(out4[:, :, 0], ref) < 1e-4


@pytest.mark.gpu
@needs_triton
def test_triton_edge_cases():
    q, k, v, idx, w = make_case(device="cuda", dtype=torch.bfloat16, layout="head", weights="same", pad=False)
    idx[0, 1] = -1
    idx[1, 2, :5] = idx[1, 2, 5]
    w[1, 3] = 0.0
    idx[1, 4, 0] = 10**6  # out of range: skipped, never read
    ref = sparse_decode_reference(q.cpu(), k.cpu(), v.cpu(), idx.cpu(), w.cpu())
    for splits in (1, 3):
        out = sparse_decode(q, k, v, idx, w, out_dtype=torch.float32, backend="triton", num_splits=splits)
        assert torch.equal(out[0, 1].cpu(), torch.zeros(q.shape[-1]))
        assert torch.equal(out[1, 3].cpu(), torch.zeros(q.shape[-1]))
        assert rel_err(out, ref) < 1e-4
    big = sparse_decode(q, k, v, idx, w * 1e30, backend="triton")
    assert torch.isfinite(big.float()).all()


@pytest.mark.gpu
@needs_triton
def test_triton_varies_with_fresh_inputs_and_matches_torch_path():
    for seed in range(3):
        q, k, v, idx, w = make_case(b=3, h=32, h_kv=8, d=128, T=4096, n=700, device="cuda",
                                    dtype=torch.bfloat16, layout="group", weights="same", seed=100 + seed)
        a = sparse_decode(q, k, v, idx, w, out_dtype=torch.float32, backend="triton")
        t = sparse_decode_torch(q, k, v, idx, w, out_dtype=torch.float32)
        assert rel_err(a, t) < 1e-4


def test_group_union_is_exact():
    from evaluator.kernels import group_union

    q, k, v, idx, w = make_case(b=2, h=8, h_kv=2, T=120, n=30, layout="head", weights="same")
    u_idx, u_w = group_union(idx, w, num_kv_heads=2, num_keys=120)
    assert u_idx.shape[:2] == (2, 2) and u_w.shape == (2, 8, u_idx.shape[2])
    ref = sparse_decode_reference(q, k, v, idx, w)
    assert rel_err(sparse_decode_reference(q, k, v, u_idx, u_w), ref) < 1e-12
    assert rel_err(sparse_decode_torch(q, k, v, u_idx, u_w), ref) < 1e-5


@pytest.mark.gpu
@needs_triton
def test_triton_union_layout():
    from evaluator.kernels import group_union

    q, k, v, idx, w = make_case(b=2, h=32, h_kv=8, d=128, T=3000, n=400, device="cuda", dtype=torch.bfloat16,
                                layout="head", weights="same", seed=7)
    u_idx, u_w = group_union(idx, w, 8, 3000)
    ref = sparse_decode_reference(q.cpu(), k.cpu(), v.cpu(), idx.cpu(), w.cpu())
    out = sparse_decode(q, k, v, u_idx, u_w, backend="triton", out_dtype=torch.float32)
    assert rel_err(out, ref) < 1e-4


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("cfg", [
    dict(block_n=128, num_warps=2, num_stages=1, ctas_per_sm=4),
    dict(block_n=32, num_warps=8, num_stages=2, ctas_per_sm=32, prefetch=False),
    dict(block_n=64, num_warps=4, num_stages=3, ctas_per_sm=16, early_v=False),
], ids=["bn128", "bn32-noprefetch", "bn64-latev"])
@pytest.mark.parametrize("layout", ["head", "group"])
def test_triton_launch_configs(cfg, layout):
    q, k, v, idx, w = make_case(b=2, h=32, h_kv=8, d=128, T=6000, n=1777, device="cuda", dtype=torch.bfloat16,
                                layout=layout, weights="same", seed=11)
    ref = sparse_decode_reference(q.cpu(), k.cpu(), v.cpu(), idx.cpu(), w.cpu())
    out = sparse_decode(q, k, v, idx, w, backend="triton", out_dtype=torch.float32, **cfg)
    assert rel_err(out, ref) < 1e-4


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("layout", ["head", "group"])
def test_triton_many_rows_defaults(layout):
    """Batch 8 at Llama shapes takes the many-rows launch defaults (longer chunks), still exact."""
    from evaluator.kernels import _triton_sparse_decode as tk

    rows = 8 * (32 if layout == "head" else 8)
    cfg = tk.default_config(rows, 1777, layout == "group", torch.device("cuda"))
    small = tk.default_config(rows // 8, 1777, layout == "group", torch.device("cuda"))
    assert cfg["num_splits"] < small["num_splits"]  # fewer chunks per row than at batch 1
    q, k, v, idx, w = make_case(b=8, h=32, h_kv=8, d=128, T=6000, n=1777, device="cuda", dtype=torch.bfloat16,
                                layout=layout, weights="same", seed=12)
    ref = sparse_decode_reference(q.cpu(), k.cpu(), v.cpu(), idx.cpu(), w.cpu())
    out = sparse_decode(q, k, v, idx, w, backend="triton", out_dtype=torch.float32)
    assert rel_err(out, ref) < 1e-4


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("layout", ["head", "group"])
def test_triton_dependent_launch_matches_plain_launch_back_to_back_and_in_a_graph(layout):
    """With programmatic dependent launch a kernel starts before the previous one ends and waits
    for its writes in-kernel: calls issued back to back (eagerly and captured in one CUDA graph)
    give exactly what plain launches give, so no merge reads a split's partials early."""
    from evaluator.kernels import _triton_sparse_decode as tk

    cases = [make_case(b=1, h=32, h_kv=8, d=128, T=8192, n=819, device="cuda", dtype=torch.bfloat16,
                       layout=layout, weights="same", seed=20 + i) for i in range(4)]
    q, k, v = cases[0][:3]
    cfg = tk.default_config(8, 819, layout == "group", q.device, pdl=True)
    assert cfg["num_splits"] > 1 and cfg["pdl"]  # the merge kernel runs, launched dependently
    plain = [sparse_decode(q, k, v, c[3], c[4], backend="triton", out_dtype=torch.float32, pdl=False) for c in cases]
    outs = [torch.empty_like(p) for p in plain]

    def calls() -> None:
        for c, o in zip(cases, outs):
            o.copy_(sparse_decode(q, k, v, c[3], c[4], backend="triton", out_dtype=torch.float32, pdl=True))

    calls()
    torch.cuda.synchronize()
    assert all(torch.equal(o, p) for o, p in zip(outs, plain))
    for o in outs:
        o.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        calls()
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(o, p) for o, p in zip(outs, plain))
