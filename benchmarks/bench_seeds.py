"""Score every seed masker on a workload; print a table and write JSON.

    python benchmarks/bench_seeds.py --workload default [--target 0.10]

Scores are computed in process (seeds are trusted code); the sandbox must reproduce them exactly.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from evaluator.inprocess import score_file
from evaluator.workload import load_workload

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="default")
    parser.add_argument("--target", type=float, default=0.10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/seeds_<workload>.json)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    wl = load_workload(args.workload, device=args.device)
    load_s = time.perf_counter() - t0
    rows = []
    for path in sorted((ROOT / "seeds").glob("*.py")):
        rep = score_file(path, wl, args.target)
        rows.append({"seed": path.stem, **{k: getattr(rep, k) for k in ("valid", "combined_score", "error", "density", "kv_density", "wall_s", "reason")}})
    table = Table(title=f"seeds on {wl.label} (target {args.target}, {args.device})")
    for col in ("seed", "combined score", "error", "density", "kv_density", "wall s"):
        table.add_column(col)
    for r in sorted(rows, key=lambda r: -(r["combined_score"] or -1e9)):
        table.add_row(r["seed"], f"{r['combined_score']:.4f}" if r["valid"] else f"INVALID: {r['reason']}",
                      f"{r['error']:.4f}" if r["valid"] else "", f"{r['density']:.4f}" if r["valid"] else "",
                      f"{r['kv_density']:.4f}" if r["valid"] else "", f"{r['wall_s']:.2f}")
    Console().print(table)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"seeds_{args.workload}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "workload": wl.label, "spec": wl.spec.model_dump(), "target": args.target, "device": args.device,
        "torch": torch.__version__, "machine": platform.machine(), "workload_load_s": load_s, "seeds": rows,
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
