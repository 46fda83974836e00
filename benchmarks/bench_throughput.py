"""Throughput before/after: seconds per candidate (fast and faithful, in process and sandboxed)
and evaluations per minute on 1..N GPUs, for this tree and, optionally, an older one.

    python benchmarks/bench_throughput.py --before /path/to/old/checkout [--slots 1 2] [--repeat 3]
    python benchmarks/bench_throughput.py --before OLD --workload synthetic --parts fast,scale   # no model needed
    python benchmarks/bench_throughput.py --fresh-workers --parts scale   # fork server against fresh workers
    python benchmarks/bench_throughput.py --slot-processes --parts scale   # thread slots against slot processes

Each tree is measured in its own child process (``PYTHONPATH`` = that tree), with the same
calls both trees have: ``score_file``, ``run_candidate`` with a warm ``WorkerPool`` (the
spare is waited for before each timed candidate, as the search loop's next proposal would
give it time to start), ``FaithfulContext.score`` in process and through a sandbox session,
and ``LocalScheduler`` over ``cuda:0..N-1`` (``--device cpu``: N CPU slots; ``per-slot * N``
copies of sink_window in flight, timed to the last result; ``--spares`` warm workers per slot,
default automatic). Per slot it reports the GPU busy share sampled with ``nvidia-smi`` and the
harness-level occupancy: the share of the timed window the slot spent evaluating, and the share
of it spent waiting for a sandbox worker to finish starting.
Parts run in priority order and are skipped once ``--budget-s`` is spent. Prints a table and
writes JSON (``--out``, default ``benchmarks/results/throughput.json``).
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # timing.py, whichever tree is measured

from synthetic import synthetic_workload  # noqa: E402
from timing import BusySampler, SlotClock, flipped_scoring, median_time as _median, saturate, steady_per_slot, timed  # noqa: E402

SEEDS = ("sink_window", "oracle_topk", "vattention")


# ---------------------------------------------------------------- child: one tree, one part
def _workload(name: str, device: str, records: int | None = None) -> Any:
    """A captured workload, or ``synthetic`` (``synthetic.py``: random records of ``default``'s
    shapes) for a machine without the model. ``records``: keep only the first that many (smoke runs on a CPU)."""
    import dataclasses

    from evaluator.workload import load_workload

    if name == "synthetic":
        return synthetic_workload(device, records)
    workload = load_workload(name, device=device, progress=False)
    return dataclasses.replace(workload, records=workload.records[:records]) if records else workload


def _spec(name: str, records: int | None) -> Any:
    """The workload's spec, for slots that load it themselves (``synthetic``: written into the cache once)."""
    from evaluator.workload import resolve_spec

    if records:
        raise SystemExit("--records cannot be combined with slot processes (they load whole workloads by spec)")
    if name == "synthetic":
        from synthetic import cached_synthetic_spec

        return cached_synthetic_spec()
    return resolve_spec(name)


def part_fast(args: argparse.Namespace) -> dict[str, Any]:
    from evaluator.inprocess import score_file
    from evaluator.sandbox import SandboxLimits, WorkerPool, run_candidate

    workload = _workload(args.workload, args.device, args.records)
    limits = SandboxLimits(wall_s=300)
    rows = {}
    with WorkerPool(limits, cuda=args.device.startswith("cuda")) as pool:
        warm = lambda: pool.wait_ready(limits.startup_s)  # noqa: E731
        for name in args.seeds:
            seed = REPO / "seeds" / f"{name}.py"
            score_file(seed, workload, 0.1)  # kernels loaded, caches warm
            run_candidate(seed, workload, 0.1, pool=pool)  # the pool learns the workload
            # After the spare is up: its start-up (torch import) would otherwise share the cores with these timings.
            t_in, ref = _median(lambda: score_file(seed, workload, 0.1), args.repeat, warm)
            t_sb, run = _median(lambda: run_candidate(seed, workload, 0.1, pool=pool), args.repeat, warm)
            rows[name] = {"fast_in_process_s": t_in, "fast_sandbox_s": t_sb,
                          "fast_worker_s": run.outcome.elapsed_s if run.outcome else None,
                          "exact": run.report.valid and run.report.combined_score == ref.combined_score,
                          "error": ref.error}
            print(name, rows[name], flush=True)
    return rows


def serve_fast(args: argparse.Namespace) -> None:
    """``--interleave``'s child: after warming every seed, answer ``inproc NAME`` / ``sandbox NAME``
    lines on stdin with one timed fast score each (a JSON line on stdout)."""
    from evaluator.inprocess import score_file
    from evaluator.sandbox import SandboxLimits, WorkerPool, run_candidate

    workload = _workload(args.workload, args.device, args.records)
    limits = SandboxLimits(wall_s=300)
    with WorkerPool(limits, cuda=args.device.startswith("cuda")) as pool:
        for name in args.seeds:
            seed = REPO / "seeds" / f"{name}.py"
            score_file(seed, workload, 0.1)
            run_candidate(seed, workload, 0.1, pool=pool)
        print("ready", flush=True)
        for line in sys.stdin:
            kind, name = line.split()
            seed = REPO / "seeds" / f"{name}.py"
            if kind == "inproc":
                t, rep = timed(lambda: score_file(seed, workload, 0.1))
                worker_s = None
            else:
                pool.wait_ready(limits.startup_s)
                t, run = timed(lambda: run_candidate(seed, workload, 0.1, pool=pool))
                rep, worker_s = run.report, run.outcome.elapsed_s if run.outcome else None
            print(json.dumps({"s": t, "worker_s": worker_s, "score": rep.combined_score}), flush=True)


def interleaved_fast(trees: dict[str, Path], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The fast part with every tree's child alive at once and their candidates alternated, so that
    a machine whose load drifts (a shared CPU box) weighs on both trees alike."""
    children = {}
    for label, tree in trees.items():
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "serve-fast", "--device", args.device,
               "--workload", args.workload, "--seeds", ",".join(args.seeds), *_shared_flags(args)]
        children[label] = subprocess.Popen(cmd, env={**_tree_env(tree), **FLAVOURS.get(label, {})}, cwd=str(tree), stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True)
    try:
        for child in children.values():
            while (line := child.stdout.readline()) and line.strip() != "ready":
                pass
        times: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for _ in range(args.repeat):
            for name in args.seeds:
                for kind in ("inproc", "sandbox"):
                    for label, child in children.items():
                        child.stdin.write(f"{kind} {name}\n")
                        child.stdin.flush()
                        times.setdefault((label, name, kind), []).append(json.loads(child.stdout.readline()))
    finally:
        for child in children.values():
            child.stdin.close()
            child.wait(60)
    out: dict[str, dict[str, Any]] = {label: {} for label in trees}
    for label in trees:
        for name in args.seeds:
            inproc, sandbox = times[(label, name, "inproc")], times[(label, name, "sandbox")]
            out[label][name] = {"fast_in_process_s": statistics.median(x["s"] for x in inproc),
                                "fast_sandbox_s": statistics.median(x["s"] for x in sandbox),
                                "fast_worker_s": statistics.median(x["worker_s"] for x in sandbox),
                                "exact": all(x["score"] == inproc[0]["score"] for x in inproc + sandbox)}
    return out


def part_faithful(args: argparse.Namespace) -> dict[str, Any]:
    from evaluator.faithful import FaithfulContext
    from evaluator.sandbox import SandboxLimits, WorkerPool

    limits = SandboxLimits(wall_s=300)
    rows = {}
    ctx = FaithfulContext(args.faithful, args.device)
    ctx.prefix_file()
    with WorkerPool(limits, cuda=args.device.startswith("cuda")) as pool:
        warm = lambda: pool.wait_ready(limits.startup_s)  # noqa: E731
        for name in args.seeds:
            seed = REPO / "seeds" / f"{name}.py"
            t_in, ref = _median(lambda: ctx.score(seed, 0.1, in_process=True), args.faithful_repeat)
            t_sb, rep = _median(lambda: ctx.score(seed, 0.1, pool=pool), args.faithful_repeat, warm)
            rows[name] = {"faithful_in_process_s": t_in, "faithful_sandbox_s": t_sb, "calls": rep.n_calls,
                          "exact": rep.valid and ref.valid and rep.error == ref.error and rep.kl == ref.kl}
            print(name, rows[name], flush=True)
    ctx.close()
    return rows


@contextlib.contextmanager
def _all_of(*managers: Any) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for manager in managers:
            stack.enter_context(manager)
        yield


@contextlib.contextmanager
def _prefilled(sched: Any) -> Iterator[None]:
    """Every slot's spares ready before the timed part, and none started during it (``--scale-mode
    prefilled``; ``--per-slot`` at most ``--spares``): what the scheduler does without worker start-ups beside it."""
    from evaluator.sandbox import WorkerPool

    for slot in sched._slots:
        assert slot._pool.wait_ready(300, every=True), "spares did not start"
    replenish = WorkerPool.replenish
    WorkerPool.replenish = lambda self: None
    try:
        yield
    finally:
        WorkerPool.replenish = replenish


def part_scale(args: argparse.Namespace) -> dict[str, Any]:
    from adrs.scheduler import LocalScheduler, local_devices
    from evaluator.sandbox import SandboxLimits

    code = (REPO / "seeds" / "sink_window.py").read_text()
    workload = _workload(args.workload, "cpu", args.records)
    # An older tree's scheduler keeps one spare and takes no ``spares``.
    takes_spares = "spares" in inspect.signature(LocalScheduler).parameters
    rows = {}
    for slots in args.slots:
        devices = ["cpu"] * slots if args.device == "cpu" else local_devices(slots)
        if args.scale_mode == "one-gpu" and devices[0] != "cpu":
            devices = [devices[0]] * slots  # needs one GPU only
        if len(devices) < slots or (args.device != "cpu" and devices[0] == "cpu"):
            rows[str(slots)] = {"skipped": f"{len(devices)} GPU(s) here"}
            continue
        extra = {"spares": args.spares} if takes_spares else {}
        if os.environ.get("BENCH_SLOT_PROCESSES") == "1":  # after-processes: each slot's harness in its own process
            extra["specs"] = {"search": _spec(args.workload, args.records), "heldout": None}
        sched = LocalScheduler(lambda which: workload, 0.10, SandboxLimits(wall_s=600), devices=devices, **extra)
        sampler, clock = BusySampler(len(set(devices))), SlotClock(sched)
        during = [clock, sampler] + ([_prefilled(sched)] if args.scale_mode == "prefilled" else [])
        try:
            per_slot = args.per_slot or (sched.spares if args.scale_mode == "prefilled" else steady_per_slot(sched))
            rows[str(slots)] = saturate(sched, code, slots, per_slot, during=_all_of(*during))
        finally:
            sched.close()
        rows[str(slots)].update({"scale_mode": args.scale_mode, "spares": getattr(sched, "spares", 1),
                                 "gpu_busy": sampler.busy(),
                                 "slot_busy": clock.share(clock.spans), "slot_wait_worker": clock.share(clock.waits)})
        print(slots, rows[str(slots)], flush=True)
    return rows


PARTS = {"fast": part_fast, "faithful": part_faithful, "scale": part_scale}
# Variants of this tree measured under their own label: the environment their child gets.
FLAVOURS = {"after-fresh": {"ADRS_FORK_SERVER": "0"}, "after-norehearse": {"ADRS_SPARE_REHEARSAL": "0"},
            "after-flipped": {"BENCH_SCORING_FLIP": "1"}, "after-processes": {"BENCH_SLOT_PROCESSES": "1"}}


def run_child(args: argparse.Namespace) -> None:
    """One tree's child: ``serve-fast``, or its parts in order, each written out once done."""
    if args.child == "serve-fast":
        serve_fast(args)
        return
    done: dict[str, Any] = {}
    for part in args.child.split(","):
        done[part] = PARTS[part](args)
        Path(args.child_out).write_text(json.dumps(done))  # what is done survives a timeout


# ---------------------------------------------------------------- parent: trees x parts, table
def _tree_env(tree: Path) -> dict[str, str]:
    """Our environment with ``tree`` first on PYTHONPATH and nothing of the other tree."""
    env = dict(os.environ)
    others = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() not in (REPO, tree)]
    env["PYTHONPATH"] = os.pathsep.join([str(tree), *others])
    return env


def _shared_flags(args: argparse.Namespace) -> list[str]:
    """The optional flags a child gets as given."""
    return [*(["--records", str(args.records)] if args.records else []),
            *(["--spares", str(args.spares)] if args.spares else [])]


def _run_child(tree: Path, part: str, args: argparse.Namespace, timeout: float, label: str) -> dict[str, Any]:
    env = {**_tree_env(tree), **FLAVOURS.get(label, {})}
    # Absolute: the child runs in its own tree, where a relative --out would land.
    out = Path(args.out).resolve().with_suffix(f".{label}.{part.replace(',', '-')}.json")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", part, "--child-out", str(out),
           "--device", args.device, "--workload", args.workload, "--faithful", args.faithful,
           "--repeat", str(args.repeat), "--faithful-repeat", str(args.faithful_repeat),
           "--seeds", ",".join(args.seeds), *(["--per-slot", str(args.per_slot)] if args.per_slot else []),
           "--slots", *map(str, args.slots),
           "--scale-mode", args.scale_mode,
           *_shared_flags(args)]
    t0 = time.perf_counter()
    try:
        subprocess.run(cmd, env=env, cwd=str(tree), timeout=timeout, check=True)
    except (subprocess.TimeoutExpired, subprocess.CalledProcessError) as exc:
        done = json.loads(out.read_text()) if out.is_file() else {}
        return {**done, "failed": f"{type(exc).__name__}", "wall_s": time.perf_counter() - t0}
    return {**json.loads(out.read_text()), "wall_s": time.perf_counter() - t0}


def _fmt(x: Any, spec: str = ".3f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, default=None, help="an older checkout to compare with")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workload", default="default")
    ap.add_argument("--faithful", default="faithful")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--faithful-repeat", type=int, default=2)
    ap.add_argument("--seeds", type=lambda s: s.split(","), default=list(SEEDS))
    ap.add_argument("--slots", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--per-slot", type=int, default=None,
                    help="scale: timed evaluations per slot (default: 4x the slot's spares, at least 8, for a steady "
                         "rate; prefilled: the spares)")
    ap.add_argument("--spares", type=int, default=None,
                    help="scale: warm sandbox workers per slot (default: automatic, as evaluation.spares: null)")
    ap.add_argument("--records", type=int, default=None, help="keep only the workload's first N records (smoke runs)")
    ap.add_argument("--parts", type=lambda s: s.split(","), default=["fast", "scale", "faithful"])
    ap.add_argument("--fresh-workers", action="store_true",
                    help="also measure this tree with every worker a fresh interpreter (no fork server): 'after-fresh'")
    ap.add_argument("--scale-mode", default="normal", choices=["normal", "prefilled", "one-gpu"],
                    help="scale part: prefilled = every spare ready first and none started while timed (threads); "
                         "one-gpu = all slots on the first GPU")
    ap.add_argument("--no-rehearsal", action="store_true",
                    help="also measure this tree with spares that skip the kernel rehearsal (ADRS_SPARE_REHEARSAL=0)")
    ap.add_argument("--flip-scoring", action="store_true",
                    help="also measure this tree with the parent scoring the other way round from its default "
                         "(after the worker or alongside it): 'after-flipped'")
    ap.add_argument("--slot-processes", action="store_true",
                    help="also measure this tree with each slot's harness in a process of its own (scale part)")
    ap.add_argument("--interleave", action="store_true",
                    help="fast part: both trees' children alive at once, candidates alternated (fair on a busy machine)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="skip parts once this much time is spent")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "throughput.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, os.getcwd())
        # after-flipped's child scores the other way round from its tree's default.
        with flipped_scoring() if os.environ.get("BENCH_SCORING_FLIP") == "1" else contextlib.nullcontext():
            run_child(args)
        return

    trees = {"after": REPO, **({"before": args.before.resolve()} if args.before else {}),
             **({"after-fresh": REPO} if args.fresh_workers else {}),
             **({"after-norehearse": REPO} if args.no_rehearsal else {}),
             **({"after-flipped": REPO} if args.flip_scoring else {}),
             **({"after-processes": REPO} if args.slot_processes else {})}
    results: dict[str, dict[str, Any]] = {label: {} for label in trees}
    t_start = time.perf_counter()
    if args.interleave and "fast" in args.parts:
        for label, rows in interleaved_fast(trees, args).items():
            results[label]["fast"] = rows
        args.parts = [p for p in args.parts if p != "fast"]
    # One child per tree and group of parts (each child pays for torch and CUDA once); groups in priority order.
    groups = [[p for p in args.parts if p != "faithful"], [p for p in args.parts if p == "faithful"]]
    for group in filter(None, groups):
        for label, tree in trees.items():
            left = args.budget_s - (time.perf_counter() - t_start)
            if left < 20:
                results[label].update({part: {"skipped": "time budget spent"} for part in group})
                continue
            got = _run_child(tree, ",".join(group), args, left, label)
            results[label].update({part: got.get(part, {"skipped": got.get("failed", "not reached")}) for part in group})
            print(f"{label} {'+'.join(group)}: {got.get('wall_s', 0):.1f} s", flush=True)
            Path(args.out).write_text(json.dumps({"results": results}, indent=1))

    labels = list(trees)
    print(f"\nfast = {args.workload}, faithful = {args.faithful}; device {args.device}; seconds per candidate, median")
    print(f"{'candidate':<12} " + " ".join(f"{c + ' ' + l:>22}" for c in ("fast in-proc", "fast sandbox", "faithful in-proc",
                                                                          "faithful sandbox") for l in labels))
    for name in args.seeds:
        cells = []
        for key, part in (("fast_in_process_s", "fast"), ("fast_sandbox_s", "fast"),
                          ("faithful_in_process_s", "faithful"), ("faithful_sandbox_s", "faithful")):
            for label in labels:
                cells.append(f"{_fmt(results[label].get(part, {}).get(name, {}).get(key)):>22}")
        print(f"{name:<12} " + " ".join(cells))
    for label in labels:
        for slots, row in results[label].get("scale", {}).items():
            if isinstance(row, dict) and "per_minute" in row:
                busy = ", ".join(_fmt(b, ".0%") for b in row["gpu_busy"])
                slot_busy = ", ".join(f"{_fmt(b, '.0%')} ({_fmt(w, '.0%')} waiting for a worker)"
                                      for b, w in zip(row.get("slot_busy", []), row.get("slot_wait_worker", [])))
                print(f"scale {label}: {slots} slot(s), {row.get('spares', 1)} spare(s) each: {row['per_minute']:.1f} evals/min, "
                      f"mean eval {row['mean_eval_s']:.2f} s, GPU busy {busy}; slot busy {slot_busy}")
    meta = {"command": "python benchmarks/bench_throughput.py " + " ".join(sys.argv[1:]), "trees": {k: str(v) for k, v in trees.items()}}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
