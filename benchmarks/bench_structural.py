"""Structural search from sink+window: best error against evaluations, beside the five seeds.

    python benchmarks/bench_structural.py [--workload small] [--heldout small-heldout] [--evaluations 100]
        [--in-flight N] [--max-search-s S] [--faithful faithful]

The search runs as `adrs run` does with `llm: structural` (candidates sandboxed); the seeds
are trusted and scored in process. The final best is re-scored (sandboxed) on the held-out
workload beside the seeds' held-out scores; with ``--faithful`` the best and the two
strongest seeds are also scored faithfully (the model decodes with their selections in every
layer; all sandboxed) and their top-1 agreement with dense decoding is compared. The search
runs in chunks of resumed runs (exact: resume replays), so ``--max-search-s`` stops it cleanly
with what was reached. Prints tables and writes benchmarks/results/structural_<workload>.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from adrs.archive import open_run
from adrs.config import parse_config
from adrs.evaluate import make_scorer
from adrs.loop import evolve
from evaluator.inprocess import score_file
from evaluator.workload import load_workload

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = (1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 150, 200, 300)


def seed_errors(workload: str, target: float) -> dict[str, float | None]:
    wl = load_workload(workload, progress=False)
    out = {}
    for path in sorted((ROOT / "seeds").glob("*.py")):
        rep = score_file(path, wl, target)
        out[path.stem] = rep.error if rep.valid else None
    return out


def best_curve(rows: list) -> list[dict]:
    """Per evaluation: the best (valid, not flagged) error so far, with the candidate that holds it."""
    curve, best = [], None
    evaluations = 0
    for r in rows:
        if r.iteration == 0:
            best = r
            continue
        if r.status == "failed" and r.category == "mutation":
            continue  # duplicates and unusable mutations are recorded, not evaluated
        evaluations += 1
        if r.status == "valid" and r.combined_score > best.combined_score:
            best = r
        curve.append({"evaluation": evaluations, "iteration": r.iteration, "best_error": best.error,
                      "best_score": best.combined_score, "best_id": best.id, "best_iteration": best.iteration,
                      "status": r.status})
    return curve


def faithful_rows(best_code: str, preset: str, target: float, seeds: dict[str, float | None]) -> dict[str, dict]:
    """Faithful reports (sandboxed, one model load) of the best and the two seeds with the lowest error."""
    from evaluator.candidate import candidate_file
    from evaluator.faithful.score import FaithfulContext

    strongest = [n for n, e in sorted(seeds.items(), key=lambda kv: kv[1] if kv[1] is not None else 9)][:2]
    ctx = FaithfulContext(preset, "cuda" if torch.cuda.is_available() else "cpu")
    try:
        out = {name: ctx.score(ROOT / "seeds" / f"{name}.py", target).to_dict() for name in strongest}
        with candidate_file(best_code) as path:
            out["structural best"] = ctx.score(path, target).to_dict()
    finally:
        ctx.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="small")
    parser.add_argument("--heldout", default="small-heldout")
    parser.add_argument("--evaluations", type=int, default=100, help="children proposed after the seed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=0.10)
    parser.add_argument("--run-dir", default=None, help="keep the run here (default: a temporary directory)")
    parser.add_argument("--in-flight", type=int, default=None, help="proposals scored at once (default: one per worker)")
    parser.add_argument("--max-search-s", type=float, default=None, help="stop the search after this long (whole chunks)")
    parser.add_argument("--chunk", type=int, default=25, help="iterations per resumed chunk")
    parser.add_argument("--faithful", default=None, help="faithful preset to compare the best with the seeds on")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    console = Console()

    seeds = seed_errors(args.workload, args.target)
    seeds_held = seed_errors(args.heldout, args.target)
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="bench-structural-"))
    cfg = parse_config({
        "name": "bench-structural", "seed": args.seed, "iterations": args.evaluations, "density_target": args.target,
        "seed_candidate": str(ROOT / "seeds" / "sink_window.py"), "workload": args.workload,
        "heldout_workload": args.heldout, "llm": "structural", "review": {"every": 0},
        "evaluation": {"in_flight": args.in_flight},
    })
    scorer = make_scorer(cfg, progress=False)
    t0 = time.perf_counter()
    try:
        done = 0
        while done < args.evaluations:
            done = min(args.evaluations, done + args.chunk)
            asyncio.run(evolve(run_dir, cfg, scorer, iterations=done))
            console.print(f"{done} iterations, {time.perf_counter() - t0:.0f} s", highlight=False)
            if args.max_search_s is not None and time.perf_counter() - t0 > args.max_search_s:
                break
        search_s = time.perf_counter() - t0
        with open_run(run_dir) as archive:
            rows = sorted(archive.all(), key=lambda r: r.iteration)
            best = archive.best()
            best_code = archive.code(best.id)
            flagged = [{"iteration": r.iteration, "reason": r.reject_reason} for r in rows if r.status == "rejected"]
        held = scorer.score(best_code, heldout=True)
    finally:
        scorer.close()
    curve = best_curve(rows)
    faithful = faithful_rows(best_code, args.faithful, args.target, seeds) if args.faithful else None

    table = Table(title=f"structural search from sink_window on {args.workload} (sandboxed, {'cuda' if torch.cuda.is_available() else platform.machine() + ' CPU'})")
    for col in ("evaluations", "best error", "best iteration"):
        table.add_column(col)
    for point in curve:
        if point["evaluation"] in CHECKPOINTS or point is curve[-1]:
            table.add_row(str(point["evaluation"]), f"{point['best_error']:.4f}", str(point["best_iteration"]))
    console.print(table)
    seeds_table = Table(title=f"seeds (in process) on {args.workload} and {args.heldout}")
    for col in ("masker", "error", "held-out error"):
        seeds_table.add_column(col)
    for name, err in sorted(seeds.items(), key=lambda kv: kv[1] if kv[1] is not None else 9):
        seeds_table.add_row(name, f"{err:.4f}" if err is not None else "invalid",
                            f"{seeds_held[name]:.4f}" if seeds_held[name] is not None else "invalid")
    seeds_table.add_row(f"structural best (iter {best.iteration})", f"{best.error:.4f}",
                        f"{held.error:.4f}" if held.valid else f"invalid: {held.reason}")
    console.print(seeds_table)
    console.print(f"best: {best.summary}")
    reached = next((p["evaluation"] for p in curve if p["best_error"] <= 0.06), None)
    console.print(f"search {search_s:.0f} s; best error <= 0.06 first reached at evaluation {reached}; "
                  f"{len(flagged)} flagged (held-out or numerics audit)")

    if faithful:
        ft = Table(title=f"faithful ({args.faithful}, sandboxed): agreement with dense decoding")
        for col in ("masker", "agreement", "faithful error", "density", "KL"):
            ft.add_column(col)
        for name, rep in faithful.items():
            ft.add_row(name, *(f"{rep.get(k):.4f}" if rep.get(k) is not None else "-"
                               for k in ("agreement", "error", "density", "kl")))
        console.print(ft)

    out = Path(args.out or ROOT / "benchmarks" / "results" / f"structural_{args.workload}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "workload": args.workload, "heldout": args.heldout, "target": args.target, "seed": args.seed,
        "evaluations_requested": args.evaluations, "torch": torch.__version__, "machine": platform.machine(),
        "search_s": search_s, "seeds_error": seeds, "seeds_heldout_error": seeds_held, "curve": curve,
        "best": {"id": best.id, "iteration": best.iteration, "error": best.error, "density": best.density,
                 "summary": best.summary, "heldout_error": held.error if held.valid else None,
                 "heldout_density": held.density if held.valid else None, "code": best_code},
        "first_evaluation_at_or_below_0.06": reached, "flagged": flagged, "faithful": faithful,
        "evaluations_done": len(curve),
    }, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
