"""Per-candidate overhead of the sandbox versus the scoring work itself.

For each workload (tiny, small) and device (cpu; cuda when available) and seed masker:

* in_process_s: load + run the masker on every record + trusted scoring, in this process;
* sandbox_cold_s: the same through ``evaluate_in_sandbox`` with a freshly started worker;
* sandbox_warm_s: the same with a warm spare worker from a ``WorkerPool`` (torch imported);
* warm_worker_s / warm_parent_s: of sandbox_warm_s, the part from handing the job to the
  worker until it exited (masker, encoding, writing selections) and the rest (job set-up,
  reading, unpacking, validating and scoring the selections in the trusted parent);
* startup_s: start a worker until it is ready (interpreter + torch + isolation);
* isolation_s: what the namespaces cost per warm candidate: sandbox_warm_s minus the same
  warm path with isolation off (the explicit opt-out), measured in the same run; and
  startup_unisolated_s, the start-up without namespaces;
* inputs_write_s: writing the workload's shared inputs file (once per workload, not per call).

Overhead ratio = (sandbox - in_process) / in_process. Prints a table and writes
benchmarks/results/sandbox.json. Usage: ``python benchmarks/bench_sandbox.py [--repeat 3]
[--workloads tiny,small] [--devices cpu,cuda] [--seeds sink_window,oracle_topk]``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evaluator.inprocess import score_file  # noqa: E402
from evaluator.sandbox import SandboxLimits, Worker, WorkerPool, evaluate_in_sandbox, run_candidate  # noqa: E402
from evaluator.sandbox.transport import workload_inputs  # noqa: E402
from evaluator.workload import load_workload  # noqa: E402

SEEDS = [REPO / "seeds" / "sink_window.py", REPO / "seeds" / "oracle_topk.py"]


def _median(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def _startup(limits: SandboxLimits, cuda: bool, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        w = Worker(limits, cuda=cuda)
        w.wait_ready(limits.startup_s)
        times.append(time.perf_counter() - t0)
        w.release()
    return statistics.median(times)


def _warm(seed: Path, workload, limits: SandboxLimits, cuda: bool, repeat: int) -> tuple[float, float, object]:
    """Median wall time of the warm path (spare already up), of its worker part, and the last report."""
    with WorkerPool(limits, cuda=cuda) as pool:
        warm, worker = [], []
        for _ in range(repeat):
            pool.wait_ready(limits.startup_s)
            t0 = time.perf_counter()
            run = run_candidate(seed, workload, 0.1, pool=pool)
            warm.append(time.perf_counter() - t0)
            worker.append(run.outcome.elapsed_s if run.outcome else float("nan"))
    return statistics.median(warm), statistics.median(worker), run.report


def bench(workload_name: str, device: str, repeat: int, limits: SandboxLimits, seeds: list[Path]) -> list[dict]:
    workload = load_workload(workload_name, device=device, progress=False)
    cuda = device == "cuda"
    unisolated = replace(limits, isolate=False, unsafe_allow_unisolated=True)
    t0 = time.perf_counter()
    workload_inputs(workload)
    inputs_write_s = time.perf_counter() - t0
    startup_s, startup_none_s = _startup(limits, cuda, repeat), _startup(unisolated, cuda, repeat)
    rows = []
    for seed in [s for s in seeds if s.exists()]:
        inproc_s, ref = _median(lambda: score_file(seed, workload, 0.1), repeat)
        cold_s, cold = _median(lambda: evaluate_in_sandbox(seed, workload, 0.1, limits=limits), repeat)
        warm_s, worker_s, rep = _warm(seed, workload, limits, cuda, repeat)
        warm_none_s, _, rep_none = _warm(seed, workload, unisolated, cuda, repeat)
        assert cold.combined_score == ref.combined_score == rep.combined_score == rep_none.combined_score, \
            (seed.name, cold.reason)
        rows.append({
            "workload": workload_name, "device": device, "candidate": seed.stem, "records": len(workload.records),
            "in_process_s": inproc_s, "sandbox_cold_s": cold_s, "sandbox_warm_s": warm_s,
            "warm_worker_s": worker_s, "warm_parent_s": warm_s - worker_s,
            "startup_s": startup_s, "startup_unisolated_s": startup_none_s, "inputs_write_s": inputs_write_s,
            "warm_unisolated_s": warm_none_s, "isolation_s": warm_s - warm_none_s, "isolation": rep.isolation,
            "overhead_cold_ratio": (cold_s - inproc_s) / inproc_s, "overhead_warm_ratio": (warm_s - inproc_s) / inproc_s,
        })
        print(_fmt(rows[-1]), flush=True)
    return rows


HEAD = f"{'workload':<8} {'dev':<5} {'candidate':<12} {'rec':>4} {'inproc s':>9} {'cold s':>8} {'warm s':>8} " \
       f"{'worker s':>8} {'parent s':>8} {'start s':>8} {'start0 s':>8} {'warm0 s':>8} {'iso s':>7} {'inputs s':>9} " \
       f"{'cold x':>7} {'warm x':>7}"


def _fmt(r: dict) -> str:
    return (f"{r['workload']:<8} {r['device']:<5} {r['candidate']:<12} {r['records']:>4} {r['in_process_s']:>9.3f} "
            f"{r['sandbox_cold_s']:>8.3f} {r['sandbox_warm_s']:>8.3f} {r['warm_worker_s']:>8.3f} {r['warm_parent_s']:>8.3f} "
            f"{r['startup_s']:>8.3f} {r['startup_unisolated_s']:>8.3f} {r['warm_unisolated_s']:>8.3f} "
            f"{r['isolation_s']:>7.3f} {r['inputs_write_s']:>9.3f} "
            f"{r['overhead_cold_ratio']:>7.2f} {r['overhead_warm_ratio']:>7.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workloads", default="tiny,small")
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--seeds", default=",".join(s.stem for s in SEEDS), help="seed maskers (names in seeds/)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sandbox.json"))
    args = ap.parse_args()
    limits = SandboxLimits(wall_s=600)
    devices = [d for d in args.devices.split(",") if d == "cpu" or torch.cuda.is_available()]
    print(HEAD)
    rows = []
    for name in args.workloads.split(","):
        for device in devices:
            rows += bench(name, device, args.repeat, limits, [REPO / "seeds" / f"{n}.py" for n in args.seeds.split(",")])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "host": platform.node()}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
