"""Measured decode speedup of a candidate's selections: the sparse-decode kernel vs dense SDPA.

The fast score says how accurate a selection is; this module says what it buys. For every
decode query of every record, the validated weights ``[b, h, q, k]`` (a per-KV-head selection
already broadcast by the scorer) are packed into the kernel's per-query-head list layout
(indices ``[b, h, n]`` padded with ``-1``, weights ``[b, h, n]``), the Triton kernel of
``evaluator.kernels`` is checked against the trusted scorer's ``sparse_attention`` on the same
selection, and then it is timed against ``torch.nn.functional.scaled_dot_product_attention``
over the same causal keys. Under GQA the group layout is timed too: one list per KV head with
per-query-head weights, which reads each selected KV row once per group. When every head of a
group lists the same keys (per-KV-head selections, page and window maskers) that list is the
shared one; otherwise it is the union of the group's lists (``group_union``; weight 0 where a
head did not pick a key), exact either way, and its bytes follow ``kv_density``. The headline
``speedup`` is dense time over the faster of the two layouts, as a serving system would choose.

Timing (CUDA only): one CUDA graph per call, so the Python launch path of ``sparse_decode``
(tens of microseconds, more than the kernel itself at short contexts) is not counted; before
every replay the L2 cache is overwritten, as in decoding, where every layer's cache was evicted
by the rest of the step since it was last read; CUDA events around the replay; the median of
``reps`` replays. The dense baseline is the faster of SDPA with ``enable_gqa=True`` and SDPA with
the group's heads folded into the query axis. Packing the lists is selection-side work and is
not timed. On a machine without CUDA (or without Triton) nothing is timed and the report says
why: a CPU number would say nothing about the kernel.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from evaluator.batch_scoring import SelectionHook
from evaluator.kernels import group_union, sparse_decode, triton_available
from evaluator.records import AttentionRecord
from evaluator.scoring import ScoreReport, dense_attention, sparse_attention

# Largest per-query relative error of the kernel against the scorer on the same rounded inputs:
# the kernel accumulates in float32 and rounds only its output (fp16: 2^-11, bf16: 2^-8), and the
# per-KV-head kernel carries P in two halves of the input dtype (about 22 bits for fp16, 16 for bf16).
CHECK_TOLERANCE = {torch.float16: 4e-3, torch.bfloat16: 2e-2, torch.float32: 1e-4}


@dataclass(frozen=True)
class DecodeList:
    """One decode query's selection in the kernel's per-query-head layout.

    indices ``[b, h, n]`` int32 ascending, ``-1`` padded; weights ``[b, h, n]`` float32, 0 on
    padding; ``num_keys``: the causal keys of this query (position + 1); ``shared``: every head of
    each GQA group lists the same keys (the per-KV-head layout then serves it exactly).
    """

    indices: torch.Tensor
    weights: torch.Tensor
    num_keys: int
    shared: bool


@dataclass(frozen=True)
class PackedSelection:
    """A record's validated selection as one ``DecodeList`` per decode query, plus its density
    (selected / causal tokens, as the scorer counts it)."""

    lists: tuple[DecodeList, ...]
    density: float
    kv_density: float | None = None

    def dense(self, query: int, num_keys: int) -> torch.Tensor:
        """Float32 weights ``[b, h, num_keys]`` of one query, rebuilt from its list."""
        lst = self.lists[query]
        b, h, _ = lst.indices.shape
        out = torch.zeros(b, h, num_keys, dtype=torch.float32, device=lst.indices.device)
        idx = lst.indices.long()
        used = idx >= 0
        out.scatter_add_(2, idx.clamp(min=0), torch.where(used, lst.weights, torch.zeros_like(lst.weights)))
        return out


def pack_selection(record: AttentionRecord, weights: torch.Tensor) -> PackedSelection:
    """Pack validated weights ``[b, h, q, k]`` of ``record`` into per-query kernel lists."""
    b, h, nq, k = weights.shape
    h_kv = record.keys.shape[1]
    group = h // h_kv
    lists = []
    selected = 0
    causal = 0
    kv_rows = 0
    for qi in range(nq):
        t = min(int(record.positions[qi]) + 1, k)
        w = weights[:, :, qi, :t].float()
        nz = w.ne(0)
        counts = nz.sum(dim=-1)
        n = max(int(counts.max()), 1)
        pos = torch.arange(t, device=w.device)
        # Selected positions sort first (ascending), unselected ones after them: top-n smallest.
        key = torch.where(nz, pos, pos + t)
        first = key.topk(n, dim=-1, largest=False, sorted=True).values
        idx = torch.where(first < t, first, torch.full_like(first, -1))
        wl = torch.where(idx >= 0, w.gather(2, idx.clamp(min=0)), torch.zeros(idx.shape, device=w.device))
        grouped = nz.view(b, h_kv, group, t)
        shared = bool((grouped == grouped[:, :, :1]).all())
        lists.append(DecodeList(idx.to(torch.int32), wl, t, shared))
        selected += int(counts.sum())
        kv_rows += int(grouped.any(dim=2).sum())
        causal += t * b * h
    return PackedSelection(tuple(lists), selected / max(causal, 1), kv_rows * group / max(causal, 1))


class SelectionCollector:
    """An ``on_selection`` hook that keeps each record's selection packed (about ``8 * density``
    of the dense weights' bytes, so a whole 8k workload fits in host memory); ``keep``: only
    these record indices (None: all)."""

    def __init__(self, keep: Sequence[int] | None = None) -> None:
        self.packed: dict[int, PackedSelection] = {}
        self.keep = None if keep is None else set(keep)

    def __call__(self, index: int, record: AttentionRecord, weights: torch.Tensor) -> None:
        if self.keep is None or index in self.keep:
            self.packed[index] = pack_selection(record, weights)


@dataclass
class RecordSpeedup:
    """Timings of one record (all its decode queries): per-query medians, summed over queries."""

    record: int
    sample: int
    layer: int
    queries: int
    density: float
    mean_keys: float
    mean_selected: float
    kv_density: float | None = None
    shared: bool = False
    dense_us: float | None = None
    sparse_us: float | None = None
    speedup: float | None = None
    kv_sparse_us: float | None = None
    kv_speedup: float | None = None
    max_rel_err: float | None = None
    error: str | None = None


@dataclass
class SpeedupReport:
    """Decode speedup of a candidate's selections; ``measured`` is False (with ``reason``) when
    nothing was timed and ``error`` is set when the kernel disagreed with the scorer."""

    measured: bool
    reason: str | None = None
    error: str | None = None
    device: str | None = None
    dtype: str | None = None
    timing: str | None = None
    n_records: int = 0
    density: float | None = None
    kv_density: float | None = None
    speedup: float | None = None  # dense time over the faster layout (per-query-head lists or the group layout)
    layout: str | None = None  # which layout that was
    mean_speedup: float | None = None
    overall_speedup: float | None = None
    kv_records: int = 0
    mean_kv_speedup: float | None = None
    overall_kv_speedup: float | None = None
    dense_us: float | None = None
    sparse_us: float | None = None
    kv_sparse_us: float | None = None
    tolerance: float | None = None
    records: list[RecordSpeedup] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """The report without its per-record rows (what an archive record keeps)."""
        return {k: v for k, v in self.to_dict().items() if k != "records"} | {
            "queries": sum(r.queries for r in self.records)}


def unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why no speedup can be measured here, or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA device: the sparse-decode kernel is timed against dense SDPA only on a GPU"
    if device is not None and torch.device(device).type != "cuda":
        return f"device {device} is not a CUDA device"
    if not triton_available():
        return "Triton does not import: the sparse-decode kernel cannot run"
    return None


class _Timer:
    """CUDA-graph replay timing with the L2 cache overwritten before each replay."""

    def __init__(self, device: torch.device, flush_l2: bool) -> None:
        self.device = device
        l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 << 20)
        self.flush_buf = torch.empty(2 * l2, dtype=torch.uint8, device=device) if flush_l2 else None

    def capture(self, fn: Callable[[], Any]) -> torch.cuda.CUDAGraph:
        """Compile/warm ``fn`` on a side stream (as graph capture requires), then capture it."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph

    def time(self, graphs: Sequence[torch.cuda.CUDAGraph], reps: int) -> list[float]:
        """Median seconds of each graph; the graphs alternate within a repetition so that slow
        drift of clocks affects them alike."""
        events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in graphs]
                  for _ in range(reps)]
        for g in graphs:
            g.replay()  # first replay uploads the graph; not timed
        for rep in events:
            for g, (a, b) in zip(graphs, rep):
                if self.flush_buf is not None:
                    self.flush_buf.zero_()
                a.record()
                g.replay()
                b.record()
        torch.cuda.synchronize(self.device)
        return [statistics.median(rep[j][0].elapsed_time(rep[j][1]) * 1e-3 for rep in events) for j in range(len(graphs))]


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float(torch.linalg.vector_norm(out.double() - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30))


def _measure_record(
    i: int, rec: AttentionRecord, packed: PackedSelection, timer: _Timer, dtype: torch.dtype, reps: int,
    tol: float, max_queries: int | None,
) -> RecordSpeedup:
    device = timer.device
    q_all = rec.queries.to(device=device, dtype=dtype)
    k_all = rec.keys.to(device=device, dtype=dtype)
    v_all = rec.values.to(device=device, dtype=dtype)
    b, h, nq, d = q_all.shape
    h_kv = k_all.shape[1]
    group = h // h_kv
    lists = packed.lists[: max_queries or nq]
    row = RecordSpeedup(
        record=i, sample=rec.sample, layer=rec.layer, queries=len(lists), density=packed.density,
        mean_keys=sum(x.num_keys for x in lists) / len(lists),
        mean_selected=sum(float(x.weights.ne(0).sum()) for x in lists) / (len(lists) * b * h),
        kv_density=packed.kv_density, shared=all(x.shared for x in lists),
    )
    dense_t, sparse_t, kv_t = [], [], []
    worst = 0.0
    for qi, lst in enumerate(lists):
        t = lst.num_keys
        q = q_all[:, :, qi].contiguous()  # [b, h, d]
        k, v = k_all[:, :, :t], v_all[:, :, :t]
        idx = lst.indices.to(device)
        w = lst.weights.to(device)
        out = torch.empty(b, h, d, device=device, dtype=dtype)
        # The scorer's estimator on the same (rounded) inputs: the check is about the kernel, not
        # about how much the cache dtype loses (a workload stored in fp16 loses nothing in fp16).
        ref = sparse_attention(q[:, :, None].float(), k.float(), v.float(),
                               packed.dense(qi, t).to(device)[:, :, None], rec.scaling)[:, :, 0]
        calls = {"sparse": lambda: sparse_decode(q, k, v, idx, w, rec.scaling, out=out, backend="triton")}
        if group > 1:
            # Selection-side work, not timed: the shared list, or the union of the group's lists.
            if lst.shared:
                idx_kv, w_kv = idx.view(b, h_kv, group, -1)[:, :, 0].contiguous(), w
                wg = w.view(b, h_kv, group, -1)
                if bool((wg == wg[:, :, :1]).all()):  # one weight list per group too: read it once
                    w_kv = wg[:, :, 0].contiguous()
            else:
                idx_kv, w_kv = group_union(idx, w, h_kv, t)
            out_kv = torch.empty_like(out)
            calls["kv"] = lambda: sparse_decode(q, k, v, idx_kv, w_kv, rec.scaling, out=out_kv, backend="triton")
        for name, fn in calls.items():
            err = _rel_err(fn(), ref)
            worst = max(worst, err)
            if not err <= tol:  # also catches NaN
                row.max_rel_err = worst
                row.error = (f"kernel ({'group' if name == 'kv' else 'per-query-head'} lists) disagrees with the "
                             f"scorer on query {qi}: relative error {err:.3g} > {tol:g}")
                return row
        q4 = q[:, :, None]  # [b, h, 1, d]
        qf = q.view(b, h_kv, group, d)  # a group's heads as query rows of its KV head
        calls["gqa"] = lambda: F.scaled_dot_product_attention(q4, k, v, scale=rec.scaling, enable_gqa=group > 1)
        calls["folded"] = lambda: F.scaled_dot_product_attention(qf, k, v, scale=rec.scaling)
        graphs = {name: timer.capture(fn) for name, fn in calls.items()}
        secs = dict(zip(graphs, timer.time(list(graphs.values()), reps)))
        dense_t.append(min(secs["gqa"], secs["folded"]))
        sparse_t.append(secs["sparse"])
        if "kv" in secs:
            kv_t.append(secs["kv"])
        del graphs
    row.max_rel_err = worst
    row.dense_us = sum(dense_t) * 1e6
    row.sparse_us = sum(sparse_t) * 1e6
    row.speedup = row.dense_us / row.sparse_us
    if len(kv_t) == len(lists):
        row.kv_sparse_us = sum(kv_t) * 1e6
        row.kv_speedup = row.dense_us / row.kv_sparse_us
    return row


def measure_speedup(
    workload: Any,
    selections: Mapping[int, PackedSelection | torch.Tensor],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float16,
    reps: int = 20,
    flush_l2: bool = True,
    max_queries: int | None = None,
    tolerance: float | None = None,
) -> SpeedupReport:
    """Time the sparse-decode kernel on ``selections`` against dense SDPA, record by record.

    ``workload``: a ``Workload`` or a sequence of ``AttentionRecord``; ``selections`` maps record
    indices to validated weights ``[b, h, q, k]`` or their ``PackedSelection`` (what
    ``SelectionCollector`` gathers from the scorer). ``dtype``: the KV-cache dtype of the timed
    calls (captured workloads are stored in fp16). ``max_queries``: time only the first decode
    queries of each record. Returns an unmeasured report on a machine without CUDA or Triton, and
    one with ``error`` (and no speedup) when the kernel disagrees with the scorer.
    """
    reason = unavailable_reason(device)
    if reason is not None:
        return SpeedupReport(measured=False, reason=reason)
    if not selections:
        return SpeedupReport(measured=False, reason="no selections to measure")
    dev = torch.device(device or "cuda")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    records = list(getattr(workload, "records", workload))
    tol = CHECK_TOLERANCE.get(dtype, 1e-2) if tolerance is None else tolerance
    timer = _Timer(dev, flush_l2)
    report = SpeedupReport(
        measured=False, device=torch.cuda.get_device_name(dev), dtype=str(dtype).replace("torch.", ""),
        timing=f"CUDA graph per call, {'L2 overwritten before each replay, ' if flush_l2 else ''}median of {reps}; "
               "dense = faster of SDPA enable_gqa and SDPA with the group folded into the query axis",
        tolerance=tol,
    )
    with torch.cuda.device(dev):
        for i in sorted(selections):
            sel = selections[i]
            rec = records[i]
            packed = sel if isinstance(sel, PackedSelection) else pack_selection(rec, sel)
            row = _measure_record(i, rec, packed, timer, dtype, reps, tol, max_queries)
            report.records.append(row)
            if row.error is not None:
                report.error = f"record {i} (sample {rec.sample}, layer {rec.layer}): {row.error}"
                report.n_records = len(report.records)
                return report
    rows = report.records
    report.measured = True
    report.n_records = len(rows)
    report.density = sum(r.density for r in rows) / len(rows)
    kvd = [r.kv_density for r in rows]
    report.kv_density = None if any(x is None for x in kvd) else sum(kvd) / len(kvd)
    report.dense_us = sum(r.dense_us for r in rows)
    report.sparse_us = sum(r.sparse_us for r in rows)
    report.mean_speedup = sum(r.speedup for r in rows) / len(rows)
    report.overall_speedup = report.dense_us / report.sparse_us
    kv = [r for r in rows if r.kv_speedup is not None]
    report.kv_records = len(kv)
    if len(kv) == len(rows):
        report.kv_sparse_us = sum(r.kv_sparse_us for r in kv)
        report.mean_kv_speedup = sum(r.kv_speedup for r in kv) / len(kv)
        report.overall_kv_speedup = report.dense_us / report.kv_sparse_us
    report.speedup, report.layout = report.overall_speedup, "per-query-head lists"
    if report.overall_kv_speedup is not None and report.overall_kv_speedup > report.overall_speedup:
        shared = all(r.shared for r in rows)
        report.speedup = report.overall_kv_speedup
        report.layout = "per-KV-head lists" if shared else "group-union lists"
    if not all(math.isfinite(x) and x > 0 for x in (report.dense_us, report.sparse_us)):
        report.measured = False
        report.speedup = None
        report.error = "a timing was not a positive finite number"
    return report


@dataclass(frozen=True)
class SpeedupOptions:
    """How much of a workload is timed per candidate (the loop's ``evaluation.speedup``): ``records``
    records spread evenly over the workload (so over its layers), the first ``queries`` decode
    queries of each, ``reps`` timed replays per call, the KV cache in ``dtype``."""

    records: int = 8
    queries: int = 2
    reps: int = 10
    dtype: torch.dtype = torch.float16

    def pick(self, n: int) -> list[int]:
        """Indices of the records to time among ``n``."""
        k = max(1, min(self.records, n))
        return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


def with_speedup(
    score: Callable[[SelectionHook | None], ScoreReport],
    workload: Any, options: SpeedupOptions | None,
) -> ScoreReport:
    """``score(on_selection)`` (the sandbox or the in-process scorer) plus, for a valid candidate, the
    measured decode speedup of the selections the scorer validated: ``report.speedup`` and
    ``report.speedup_info`` (how it was measured; or why nothing was, then ``speedup`` is None).
    ``options=None``: just ``score(None)``.

    Only trusted code runs here: the kernel and SDPA are timed on selections the candidate returned
    through the sandbox, never on anything it computes itself.
    """
    if options is None:
        return score(None)
    records = list(getattr(workload, "records", workload))
    device = records[0].queries.device
    if device.type != "cuda" and torch.cuda.is_available():  # a CPU-held workload is timed on the current GPU
        device = torch.device("cuda", torch.cuda.current_device())
    reason = unavailable_reason(device)
    if reason is not None:
        report = score(None)
        if report.valid:
            report.speedup_info = {"measured": False, "reason": reason}
        return report
    keep = options.pick(len(records))
    collector = SelectionCollector(keep)
    report = score(collector)
    if not report.valid:
        return report
    speed = measure_speedup(records, collector.packed, device=device, dtype=options.dtype, reps=options.reps,
                            max_queries=options.queries)
    report.speedup = speed.speedup if speed.measured else None
    report.speedup_info = speed.summary() | {"records_timed": keep}
    return report


def synthetic_record(
    context: int = 1024, heads: int = 9, kv_heads: int = 3, head_dim: int = 64, n_queries: int = 4,
    seed: int = 0, device: torch.device | str = "cpu", layer: int = 0, num_layers: int = 1,
) -> AttentionRecord:
    """A random record for tests and benchmarks without a model (default: SmolLM2's head layout).

    The decode queries sit at the last ``n_queries`` positions; q, k, v are rounded to fp16 as a
    captured workload is, so timing in fp16 loses nothing.
    """
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(1, heads, n_queries, head_dim, generator=g) * 2).half().float().to(device)
    k = torch.randn(1, kv_heads, context, head_dim, generator=g).half().float().to(device)
    v = torch.randn(1, kv_heads, context, head_dim, generator=g).half().float().to(device)
    pos = torch.arange(context - n_queries, context, device=device)
    scaling = head_dim ** -0.5
    return AttentionRecord(0, layer, num_layers, q, k, v, pos, scaling, dense_attention(q, k, v, pos, scaling))


def score_with_speedup(
    path: str | Path, workload: Any, density_target: float = 0.10, sandbox: bool = True,
    limits: Any = None, **measure: Any,
) -> tuple[ScoreReport, SpeedupReport]:
    """Score a candidate file (in the sandbox unless ``sandbox=False``, for trusted code) and
    measure the decode speedup of the selections the scorer validated.

    ``limits``: ``SandboxLimits`` for the sandbox; ``measure``: keyword arguments of
    ``measure_speedup``. Without CUDA the score is computed as usual and the speedup report says why
    nothing was timed; an invalid candidate gets no speedup either.
    """
    reason = unavailable_reason(measure.get("device"))
    collector = SelectionCollector() if reason is None else None
    if sandbox:
        from evaluator.sandbox import evaluate_in_sandbox

        report = evaluate_in_sandbox(path, workload, density_target, limits=limits, on_selection=collector)
    else:
        from evaluator.inprocess import score_file

        report = score_file(path, workload, density_target, on_selection=collector)
    if reason is not None:
        return report, SpeedupReport(measured=False, reason=reason)
    if not report.valid:
        return report, SpeedupReport(measured=False, reason=f"the candidate has no valid selections ({report.category}: "
                                                             f"{report.reason})")
    return report, measure_speedup(workload, collector.packed, **measure)
