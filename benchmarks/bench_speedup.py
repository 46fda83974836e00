"""Benchmark: measured decode speedup of each seed's selections, sparse-decode kernel vs dense SDPA.

For every seed in ``seeds/``: score it on a captured workload through
``evaluator.speedup.score_with_speedup`` (in process by default: seeds are trusted; ``--sandbox``
takes the untrusted path) and time the kernel on the selections the scorer validated; then the
same on synthetic records at longer contexts (random fp16 q/k/v, the seed's masker run on them),
where the KV cache no longer fits in L2 and the kernel's byte savings can show.

Each decode query is one CUDA-graph call with the L2 cache overwritten before it (see
``evaluator/speedup.py``); the per-query-head column is one list per query head, the group
column one list per KV head (the shared list of a per-KV-head selection, else the union of the
group's lists, whose length follows kv_density); "x best" is dense over the faster of the two.

    python benchmarks/bench_speedup.py --workload '' --shapes llama8b --contexts 32768 131072 \\
        --records 2 --queries 2 --out benchmarks/results/speedup_h200.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluator.candidate import load_masker, masker_input  # noqa: E402
from evaluator.scoring import InvalidSelection, dense_weights, record_scores  # noqa: E402
from evaluator.speedup import SpeedupReport, measure_speedup, score_with_speedup, synthetic_record  # noqa: E402

SEEDS = sorted((Path(__file__).resolve().parents[1] / "seeds").glob("*.py"))
SHAPES = {"smollm2": (9, 3, 64), "llama8b": (32, 8, 128)}


def summary(speed: SpeedupReport) -> dict[str, Any]:
    """The report without its per-record rows, plus per-query means (the table's columns)."""
    out = speed.summary()
    n = sum(r.queries for r in speed.records) or 1
    for key in ("dense_us", "sparse_us", "kv_sparse_us"):
        out[key.replace("_us", "_us_per_query")] = None if out.get(key) is None else out[key] / n
    out["max_rel_err"] = max((r.max_rel_err or 0.0) for r in speed.records) if speed.records else None
    return out


def synthetic_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for shape in args.shapes:
        h, h_kv, d = SHAPES[shape]
        for ctx in args.contexts:
            recs = [synthetic_record(ctx, h, h_kv, d, args.queries, seed=s, device="cuda", layer=s, num_layers=args.records)
                    for s in range(args.records)]
            for path in SEEDS:
                masker = load_masker(path)
                row: dict[str, Any] = dict(source=f"synthetic {shape} {ctx // 1024}k", seed=path.stem, context=ctx,
                                           records=len(recs), queries=args.queries)
                t0 = time.perf_counter()
                try:
                    weights = {i: dense_weights(masker(masker_input(r, args.target, 0)), r) for i, r in enumerate(recs)}
                except InvalidSelection as exc:
                    row["error"] = f"invalid selection: {exc}"
                    rows.append(row)
                    continue
                scores = [record_scores(r, weights[i]) for i, r in enumerate(recs)]
                row["error_vs_dense"] = sum(x[0] for x in scores) / len(recs)
                speed = measure_speedup(recs, weights, reps=args.reps)
                row.update(summary(speed), wall_s=time.perf_counter() - t0)
                for j, key in ((1, "density"), (2, "kv_density")):  # also where nothing was timed
                    row[key] = sum(x[j] for x in scores) / len(recs) if row.get(key) is None else row[key]
                rows.append(row)
                print_row(row)
                del weights
            del recs
            torch.cuda.empty_cache()
    return rows


def workload_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    from evaluator.workload import load_workload

    wl = load_workload(args.workload, device="cuda", progress=False)
    rows = []
    for path in SEEDS:
        t0 = time.perf_counter()
        score, speed = score_with_speedup(path, wl, args.target, sandbox=args.sandbox, reps=args.reps,
                                          max_queries=args.max_queries)
        row = dict(source=f"workload {wl.label}", seed=path.stem, context=int(wl.records[0].keys.shape[2]),
                   records=len(wl.records), queries=int(wl.records[0].queries.shape[2]),
                   score_valid=score.valid, error_vs_dense=score.error, combined_score=score.combined_score,
                   score_density=score.density, score_kv_density=score.kv_density)
        row.update(summary(speed), wall_s=time.perf_counter() - t0)
        rows.append(row)
        print_row(row)
    return rows


def fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_row(r: dict[str, Any]) -> None:
    print(f"| {r['source']} | {r['seed']} | {fmt(r.get('density'), '.3f')} | {fmt(r.get('kv_density'), '.3f')} | "
          f"{fmt(r.get('error_vs_dense'), '.4f')} | "
          f"{fmt(r.get('dense_us_per_query'), '.2f')} | {fmt(r.get('sparse_us_per_query'), '.2f')} | "
          f"{fmt(r.get('overall_speedup'), '.2f')} | {fmt(r.get('kv_sparse_us_per_query'), '.2f')} | "
          f"{fmt(r.get('overall_kv_speedup'), '.2f')} | {fmt(r.get('speedup'), '.2f')} | {fmt(r.get('max_rel_err'), '.1e')} | "
          f"{r.get('error') or r.get('reason') or ''} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="tiny", help="captured workload preset ('' to skip)")
    ap.add_argument("--sandbox", action="store_true", help="score through the sandbox (default: in process)")
    ap.add_argument("--max-queries", type=int, default=None, help="time only the first decode queries per record")
    ap.add_argument("--contexts", type=int, nargs="*", default=[8192, 32768], help="synthetic contexts")
    ap.add_argument("--shapes", nargs="*", default=["smollm2"], choices=sorted(SHAPES))
    ap.add_argument("--records", type=int, default=4, help="synthetic records per context")
    ap.add_argument("--queries", type=int, default=4, help="decode queries per synthetic record")
    ap.add_argument("--target", type=float, default=0.10)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "speedup.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    import triton

    t_start = time.time()
    result: dict[str, Any] = dict(
        benchmark="speedup", command=" ".join([os.path.basename(sys.executable)] + sys.argv),
        device=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__,
        python=platform.python_version(), target=args.target, rows=[],
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print("| source | seed | density | kv_density | error | dense us/query | per-head us/query | x dense | group us/query "
          "| x dense (group) | x best | kernel rel err | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    if args.workload:
        result["rows"] += workload_rows(args)
        out.write_text(json.dumps(result, indent=1))  # keep what is done if a later part is cut off
    result["rows"] += synthetic_rows(args)
    result["wall_s"] = time.time() - t_start
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
