"""Evaluations per minute with 1..N evaluation slots (GPUs, CPU workers or Ray actors).

    python benchmarks/bench_scale.py [--workload default] [--slots 1 2] [--per-slot N]
    python benchmarks/bench_scale.py --executor ray --ray-address HEAD:6379 --slots 1 2 4
    python benchmarks/bench_scale.py --workload synthetic --executor ray   # no model needed (synthetic.py)

Local: one slot per GPU (``cuda:0`` .. ``cuda:N-1``), or N CPU workers where there is no GPU.
Every slot first scores two candidates (worker start-up, workload copied to its device, the
pool's spares then preload it), then
``per-slot * N`` copies of the seed are submitted at once and timed to the last result: the
throughput a run sees when its LLM keeps enough proposals in flight. Prints a table and
writes ``benchmarks/results/scale_<device>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adrs.scheduler import LocalScheduler, Scheduler, local_devices  # noqa: E402
from evaluator.sandbox import SandboxLimits  # noqa: E402
from evaluator.workload import WorkloadSpec, load_workload, resolve_spec  # noqa: E402
from synthetic import cached_synthetic_spec  # noqa: E402
from timing import saturate, steady_per_slot  # noqa: E402

SEED = ROOT / "seeds" / "sink_window.py"


def _spec(args: argparse.Namespace) -> WorkloadSpec:
    """The workload's spec; ``synthetic``: random records written into the workload cache once."""
    if args.workload == "synthetic":
        return cached_synthetic_spec(samples=args.synthetic_samples)
    return resolve_spec(args.workload)


def _scheduler(args: argparse.Namespace, slots: int) -> tuple[Scheduler, str]:
    limits = SandboxLimits(wall_s=600)
    if args.executor == "ray":
        from adrs.scheduler.ray_backend import RayScheduler

        sched = RayScheduler({"search": _spec(args)}, 0.10, limits, address=args.ray_address, workers=slots)
        return sched, "ray-gpu" if sched.use_gpu else "ray-cpu"
    devices = local_devices(slots)
    if devices[0] == "cpu" and args.split_threads:
        # CPU workers share the cores: without this, N workers each run all-core torch ops.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // slots))
    if len(devices) < slots:
        raise SystemExit(f"asked for {slots} slots, this machine has {len(devices)} GPU(s)")
    workload = load_workload(_spec(args), progress=False)
    return LocalScheduler(lambda which: workload, 0.10, limits, devices=devices), devices[0].split(":")[0]


def measure(args: argparse.Namespace, slots: int) -> dict:
    code = SEED.read_text()
    sched, kind = _scheduler(args, slots)
    try:
        row = saturate(sched, code, slots, args.per_slot or steady_per_slot(sched))
    finally:
        sched.close()
    return {"slots": slots, "kind": kind, "torch_threads": torch.get_num_threads(), **row}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", default="default", help="a preset, or synthetic (random records, no model)")
    ap.add_argument("--synthetic-samples", type=int, default=4, help="synthetic: samples of 30 records each")
    ap.add_argument("--slots", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--per-slot", type=int, default=None,
                    help="timed evaluations per slot (default: 4x the slot's spares, at least 8, for a steady rate)")
    ap.add_argument("--executor", choices=["local", "ray"], default="local")
    ap.add_argument("--ray-address", default=None)
    ap.add_argument("--split-threads", action="store_true",
                    help="CPU workers: give each cores/N torch threads (changes float results slightly)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    rows = [measure(args, s) for s in args.slots]
    base = rows[0]["per_minute"] / rows[0]["slots"]
    table = Table("slots", "kind", "evaluations", "elapsed s", "evals/min", "speed-up", "mean eval s",
                  title=f"bench_scale: {args.workload}, {args.executor}")
    for r in rows:
        r["speedup_vs_first"] = r["per_minute"] / rows[0]["per_minute"]
        r["efficiency"] = r["per_minute"] / (base * r["slots"])
        table.add_row(str(r["slots"]), r["kind"], str(r["evaluations"]), f"{r['elapsed_s']:.1f}",
                      f"{r['per_minute']:.1f}", f"{r['speedup_vs_first']:.2f}x", f"{r['mean_eval_s']:.2f}")
    Console().print(table)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    result = {"workload": args.workload, "executor": args.executor, "device": device,
              "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
              "cpu_cores": os.cpu_count(), "rows": rows,
              "command": " ".join(["python", "benchmarks/bench_scale.py", *sys.argv[1:]])}
    out = args.out or ROOT / "benchmarks" / "results" / f"scale_{rows[0]['kind']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
