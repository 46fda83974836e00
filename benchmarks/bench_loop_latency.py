"""Loop throughput against an LLM with a fixed reply latency (or an LLM-free mutator), versus
the bound it sets, on 1..N evaluation workers.

    python benchmarks/bench_loop_latency.py [--latency 2.0] [--in-flight 1 4] [--iterations 12]
    python benchmarks/bench_loop_latency.py --workload default --workers 1 2 --in-flight 8 --mutator loopback structural

``loopback``: an OpenAI-compatible server on loopback answers every request after ``latency``
seconds with a full rewrite of the EVOLVE block. With N proposals in flight, W workers (one per
GPU) and an evaluation taking t_eval seconds, a run can commit at most
min(N / (latency + t_eval), W / t_eval) candidates a second (a proposal slot is held while its
child is scored). ``structural``/``offline``: the LLM-free mutators (``evaluation.in_flight`` =
N), bounded by W / t_eval. The table reports evaluations per hour against that bound and, with
several worker counts, the speed-up over the first; children audited (each one more evaluation)
and duplicates (recorded, not evaluated); and, sandboxed, each slot's share of the run spent
evaluating and (with CUDA) each GPU's kernel-time share sampled by ``nvidia-smi``.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from loopback_openai import LoopbackOpenAI, Reply  # noqa: E402
from timing import BusySampler, SlotClock  # noqa: E402

from adrs.archive import open_run  # noqa: E402
from adrs.config import parse_config  # noqa: E402
from adrs.evaluate import make_scorer  # noqa: E402
from adrs.loop import evolve  # noqa: E402

REWRITE = '''Use {n} sink tokens.
```python
SINK_TOKENS = {n}


def masker(inp: MaskerInput) -> Selection:
    keep = budget(inp)
    sink = torch.clamp(keep, max=SINK_TOKENS)
    window = keep - sink
    k = torch.arange(inp.num_keys, device=inp.keys.device)[None, :]
    pos = inp.query_positions.to(inp.keys.device)[:, None]
    selected = ((k < sink[:, None]) | (k > pos - window[:, None])) & causal_mask(inp)
    b, h = inp.queries.shape[:2]
    return selected.float().expand(b, h, -1, -1)
```
'''


def measure(latency: float, in_flight: int, iterations: int, workload: str, in_process: bool,
            workers: int | None = None, mutator: str = "loopback", slot_processes: bool | None = None) -> dict:
    # Every reply is new code (SINK_TOKENS = 8, 9, ...): a repeated reply would be recorded as a
    # duplicate without being evaluated, and the run would measure the LLM alone.
    replies = [lambda body, n=n: Reply(REWRITE.replace("{n}", str(n)), delay_s=latency) for n in range(8, 8 + 4 * iterations + 64)]
    with LoopbackOpenAI(replies) as server, tempfile.TemporaryDirectory() as tmp:
        evaluation = {"in_process": in_process, "slot_processes": slot_processes, **({"workers": workers} if workers else {})}
        if mutator == "loopback":
            llm: object = {"models": [{"name": "loopback", "base_url": server.base_url, "api_key_env": None}],
                           "max_in_flight": in_flight}
        else:
            llm, evaluation["in_flight"] = mutator, in_flight
        spec: object = workload
        if workload == "synthetic":  # random records of default's shapes, from the workload cache: no model
            from synthetic import cached_synthetic_spec

            spec = cached_synthetic_spec().model_dump()
        cfg = parse_config({
            "name": "bench", "workload": spec, "heldout_workload": None, "iterations": iterations,
            "seed_candidate": str(ROOT / "seeds" / "sink_window.py"), "evaluation": evaluation, "llm": llm,
        })
        scorer = make_scorer(cfg, progress=False)
        try:
            code = (ROOT / "seeds" / "sink_window.py").read_text()
            scorer.score(code)  # warm-up
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                scorer.score(code)
                times.append(time.perf_counter() - t0)
            t_eval = sorted(times)[1]
            run_dir = Path(tmp) / "run"
            asyncio.run(evolve(run_dir, cfg, scorer, iterations=0))  # the seed, outside the timed part
            sched = None if in_process else scorer.scheduler()
            sampler = BusySampler(sched.slots) if sched is not None and torch.cuda.is_available() else contextlib.nullcontext()
            clock = SlotClock(sched) if sched is not None else contextlib.nullcontext()
            with sampler, clock:
                t0 = time.perf_counter()
                asyncio.run(evolve(run_dir, cfg, scorer, iterations=iterations))
                elapsed = time.perf_counter() - t0
            # Each slot's share of the run spent evaluating (children, audits), and its GPU's kernel-time share.
            slot_busy = clock.share(clock.spans) if isinstance(clock, SlotClock) else None
            gpu_busy = sampler.busy() if isinstance(sampler, BusySampler) else None
            with open_run(run_dir) as archive:  # each audited child cost one more evaluation (two if the best had none)
                records = [archive.record(r.id) for r in archive.all() if r.iteration > 0]
                audits = sum(1 for rec in records if "audit" in rec)
                duplicates = sum(1 for rec in records if str(rec.get("reason") or "").startswith("duplicate"))
        finally:
            scorer.close()
    w = workers or 1
    rate = iterations / elapsed * 3600
    bound = (min(in_flight / (latency + t_eval), w / t_eval) if mutator == "loopback" else w / t_eval) * 3600
    return {"mutator": mutator, "latency_s": latency if mutator == "loopback" else None, "in_flight": in_flight,
            "workers": workers, "slot_processes": slot_processes, "iterations": iterations, "t_eval_s": t_eval, "elapsed_s": elapsed,
            "evals_per_hour": rate, "bound_per_hour": bound, "fraction_of_bound": rate / bound, "audited": audits,
            "duplicates": duplicates, "slot_busy": slot_busy, "gpu_busy": gpu_busy}


def _shares(values: list[float | None] | None) -> str:
    return "-" if not values else " ".join("-" if v is None else f"{v:.0%}" for v in values)


def _write(args: argparse.Namespace, rows: list[dict]) -> None:
    Path(args.out).write_text(json.dumps({"workload": args.workload, "in_process": args.in_process, "command": " ".join(sys.argv),
                                          "rows": rows}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=2.0)
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--workload", default="tiny", help="a preset, or synthetic (random records, no model)")
    parser.add_argument("--workers", type=int, nargs="+", default=[None],
                        help="evaluation workers (one per GPU); default: the config's (one per visible GPU, or 1)")
    parser.add_argument("--mutator", nargs="+", default=["loopback"], choices=["loopback", "structural", "offline"])
    parser.add_argument("--slot-processes", nargs="+", default=["auto"], choices=["auto", "on", "off"],
                        help="evaluation.slot_processes: each GPU's harness in a process of its own (auto: with 2+ GPUs)")
    parser.add_argument("--in-process", action="store_true", help="score without the sandbox")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "loop_latency.json"))
    args = parser.parse_args()
    rows = []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for m in args.mutator:
        for n in args.in_flight:
            for procs in args.slot_processes:
                for w in args.workers:
                    rows.append(measure(args.latency, n, args.iterations, args.workload, args.in_process, w, m,
                                        {"auto": None, "on": True, "off": False}[procs]))
                    print(rows[-1], flush=True)
                    _write(args, rows)  # what is measured survives a time limit
    table = Table(title=f"loop throughput ({args.workload}, {'in process' if args.in_process else 'sandbox'}; "
                        f"loopback LLM latency {args.latency}s)")
    for col in ("mutator", "in flight", "slot procs", "workers", "t_eval s", "evals/hour", "bound/hour", "of bound", "x first workers",
                "audited", "dup.", "slots busy", "GPUs busy"):
        table.add_column(col)
    for r in rows:
        first = next(x for x in rows if x["mutator"] == r["mutator"] and x["in_flight"] == r["in_flight"]
                     and x["slot_processes"] == r["slot_processes"])
        procs = {None: "auto", True: "on", False: "off"}[r["slot_processes"]]
        table.add_row(r["mutator"], str(r["in_flight"]), procs, str(r["workers"] or "auto"), f"{r['t_eval_s']:.2f}",
                      f"{r['evals_per_hour']:.0f}", f"{r['bound_per_hour']:.0f}", f"{r['fraction_of_bound']:.0%}",
                      f"{r['evals_per_hour'] / first['evals_per_hour']:.2f}", str(r["audited"]), str(r["duplicates"]),
                      _shares(r["slot_busy"]), _shares(r["gpu_busy"]))
    Console().print(table)
    _write(args, rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
