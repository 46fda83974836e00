"""Benchmark 1: seconds per candidate for fast and faithful scoring, and workload capture time.

For the fast workload (default: 'default', 4 samples x 30 layers x 32 queries at 8k) and the
faithful spec (default: 'faithful', 8 needle prompts near 8k tokens, question + 20 decode steps
sparse in all 30 layers), per seed masker:

* fast_in_process_s / fast_sandbox_s: ``score_file`` in process / ``evaluate_in_sandbox`` end to
  end with a warm spare worker (the search loop's path);
* faithful_in_process_s / faithful_sandbox_s: ``FaithfulContext.score`` in process / through a
  sandbox session (warm spare worker; every masker call a round trip);
* one-off costs: model dequantization, workload capture, the faithful context (model load,
  prompts, dense prefill, dense reference decode) and the keys file sent to workers.

Also checks that sandboxed and in-process numbers agree and that select-all reproduces dense
decoding exactly. Prints a table and writes JSON.
Usage: ``python benchmarks/bench_scoring.py [--device cuda] [--repeat 3] [--out PATH]``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evaluator.faithful import FaithfulContext  # noqa: E402
from evaluator.inprocess import score_file  # noqa: E402
from evaluator.sandbox import SandboxLimits, WorkerPool, run_candidate  # noqa: E402
from evaluator.workload import load_workload, resolve_spec, workload_dir  # noqa: E402
from evaluator.workload.capture import capture_workload  # noqa: E402
from evaluator.workload.model import embedded_gguf_path, ensure_dequantized  # noqa: E402
from timing import median_time as _median, timed as _timed  # noqa: E402

SEEDS = [REPO / "seeds" / "sink_window.py", REPO / "seeds" / "oracle_topk.py", REPO / "seeds" / "vattention.py"]
SELECT_ALL = REPO / "tests" / "candidates" / "select_all.py"


def one_off(workload: str, device: str) -> dict[str, Any]:
    """Dequantization and capture times (or the recorded capture time when the cache was warm)."""
    dequant_s, _ = _timed(lambda: ensure_dequantized(embedded_gguf_path()))
    spec = resolve_spec(workload)
    cached = (workload_dir(spec) / "spec.json").is_file()
    wall, path = _timed(lambda: capture_workload(spec, device=device, progress=False))
    recorded = json.loads((path / "spec.json").read_text()).get("capture_s")
    return {"dequantize_s": dequant_s, "capture_cached": cached, "capture_s": recorded if cached else wall,
            "capture_wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workload", default="default")
    ap.add_argument("--faithful", default="faithful")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seeds", default=",".join(s.stem for s in SEEDS))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scoring.json"))
    args = ap.parse_args()
    seeds = [REPO / "seeds" / f"{name}.py" for name in args.seeds.split(",")]
    limits = SandboxLimits(wall_s=300)
    cuda = args.device.startswith("cuda")

    costs = one_off(args.workload, args.device)
    print(f"one-off: {costs}", flush=True)
    workload = load_workload(args.workload, device=args.device, progress=False)
    rows: list[dict[str, Any]] = []
    with WorkerPool(limits, cuda=cuda) as pool:
        warm = lambda: pool.wait_ready(limits.startup_s)  # noqa: E731 - time the warm path
        for seed in seeds:
            t_in, ref = _median(lambda: score_file(seed, workload, 0.1), args.repeat)
            t_sb, run = _median(lambda: run_candidate(seed, workload, 0.1, pool=pool), args.repeat, warm)
            rep = run.report
            rows.append({"candidate": seed.stem, "fast_in_process_s": t_in, "fast_sandbox_s": t_sb,
                         "fast_worker_s": run.outcome.elapsed_s if run.outcome else None,
                         "fast_error": rep.error, "fast_density": rep.density,
                         "fast_exact": rep.valid and rep.combined_score == ref.combined_score})
            print(rows[-1], flush=True)
        del workload
        ctx_s, ctx = _timed(lambda: FaithfulContext(args.faithful, args.device))
        prefix_s, _ = _timed(ctx.prefix_file)
        print(f"faithful context {ctx_s:.2f} s, keys file {prefix_s:.2f} s", flush=True)
        checks: dict[str, Any] = {}
        warm()
        dense = ctx.score(SELECT_ALL, 0.1, pool=pool)
        checks["select_all_exact"] = dense.valid and dense.error == 0.0 and dense.agreement == 1.0 and dense.kl == 0.0
        for row, seed in zip(rows, seeds):
            t_in, ref = _median(lambda: ctx.score(seed, 0.1, in_process=True), args.repeat)
            t_sb, rep = _median(lambda: ctx.score(seed, 0.1, pool=pool), args.repeat, warm)
            timing = ("wall_s", "candidate_s")
            same = rep.valid and ref.valid and {k: v for k, v in rep.to_dict().items() if k not in timing} == \
                {k: v for k, v in ref.to_dict().items() if k not in timing}
            row.update({"faithful_in_process_s": t_in, "faithful_sandbox_s": t_sb, "faithful_calls": rep.n_calls,
                        "faithful_worker_wait_s": rep.candidate_s,
                        "faithful_error": rep.error, "faithful_density": rep.density, "agreement": rep.agreement,
                        "kl": rep.kl, "needle_accuracy": rep.needle_accuracy, "faithful_exact": same,
                        "faithful_reason": rep.reason})
            print(row, flush=True)
        dense_acc = dense.dense_needle_accuracy
        ctx.close()

    print(f"\nfast = {args.workload}, faithful = {args.faithful} ({ctx.spec.n_samples} samples x {ctx.spec.prompt_tokens} "
          f"tokens, {ctx.spec.decode_steps} steps); device {args.device}; median of {args.repeat}")
    print(f"{'candidate':<12} {'fast in-proc s':>14} {'fast sandbox s':>14} {'faithful in-proc s':>18} "
          f"{'faithful sandbox s':>18} {'error':>7} {'agree':>6} {'KL':>7} {'needle':>6}")
    for r in rows:
        print(f"{r['candidate']:<12} {r['fast_in_process_s']:>14.3f} {r['fast_sandbox_s']:>14.3f} "
              f"{r['faithful_in_process_s']:>18.3f} {r['faithful_sandbox_s']:>18.3f} {r['faithful_error'] or 0:>7.3f} "
              f"{r['agreement'] or 0:>6.3f} {r['kl'] or 0:>7.3f} {r['needle_accuracy'] or 0:>6.2f}")
    print(f"one-off: dequantize {costs['dequantize_s']:.1f} s, capture {args.workload} {costs['capture_s']:.1f} s"
          f"{' (recorded, cache was warm)' if costs['capture_cached'] else ''}, faithful context {ctx_s:.1f} s, "
          f"keys file {prefix_s:.1f} s; dense needle accuracy {dense_acc}; checks {checks}")
    meta = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
            "workload": args.workload, "faithful": args.faithful, "repeat": args.repeat,
            "command": "python benchmarks/bench_scoring.py " + " ".join(sys.argv[1:])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "one_off": {**costs, "faithful_context_s": ctx_s, "keys_file_s": prefix_s},
                               "checks": {**checks, "dense_needle_accuracy": dense_acc}, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
