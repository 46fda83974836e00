"""`adrs score`: one candidate file, fast or faithful, with an optional decode-speedup measurement."""
from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from adrs.cli.common import UserError, command, out, report_table

FAITHFUL_KEYS = ("valid", "combined_score", "error", "density", "kv_density", "agreement", "kl", "kl_max", "needle_accuracy",
                 "dense_needle_accuracy", "n_calls", "wall_s", "candidate_s", "category", "reason", "spec", "isolation")
UNSAFE_HELP = ("where the kernel allows no sandbox namespaces, run the candidate anyway with weaker containment "
               "(reported as NOT ISOLATED); for code you would run yourself")
# Spelled out rather than read from evaluator.workload.spec, which imports torch (seconds, for --help);
# tests/test_cli.py checks that it names every preset.
PRESET_NAMES = ("tiny", "tiny-heldout", "small", "small-heldout", "default", "heldout")
WORKLOAD_HELP = ("workload preset: " + ", ".join(PRESET_NAMES) + " (tiny: 256 tokens, seconds on CPU; small: 2k; "
                 "default/heldout: 8k, minutes on CPU)")


@command()
def score(
    file: Path = typer.Argument(..., help="candidate file (Python, with an EVOLVE block)", metavar="FILE", show_default=False),
    workload: str = typer.Option("small", help=WORKLOAD_HELP),
    target: float = typer.Option(0.10, help="density target"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
    in_process: bool = typer.Option(False, "--in-process", help="run the candidate in this process (trusted code only)"),
    timeout: float = typer.Option(300.0, help="wall-time limit for the candidate, seconds"),
    speedup: bool = typer.Option(False, "--speedup", help="also time its selections with the sparse-decode kernel vs dense SDPA (CUDA)"),
    faithful: bool = typer.Option(False, "--faithful", help="faithful score: the model decodes with the selections in every layer"),
    unsafe: bool = typer.Option(False, "--unsafe-allow-unisolated", help=UNSAFE_HELP),
) -> None:
    """Score one candidate file: fast (per-layer error on cached activations) or --faithful (a real sparse decode)."""
    from evaluator.sandbox import SandboxLimits
    from evaluator.speedup import score_with_speedup
    from evaluator.workload import load_workload

    if not file.is_file():
        raise UserError(f"no such candidate file: {file}")
    if faithful:
        report = faithful_report(file, faithful_preset(workload), target, in_process,
                                 SandboxLimits(wall_s=timeout, unsafe_allow_unisolated=unsafe))
        print_faithful(report, json_out)
        raise typer.Exit(0 if report.valid else 1)
    try:
        wl = load_workload(workload, progress=not json_out)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    limits = SandboxLimits(wall_s=timeout, unsafe_allow_unisolated=unsafe)
    if speedup:
        report, speed = score_with_speedup(file, wl, target, sandbox=not in_process, limits=limits)
    else:
        report, speed = _evaluate(file, wl, target, in_process, limits), None
    data = report.to_dict()
    if json_out:
        print(json.dumps(data | ({"speedup": speed.to_dict()} if speed is not None else {})))
    else:
        out.print(report_table(data))
        if data.get("per_layer"):
            layers = Table("layer", "error", "density", title="per layer")
            for row in data["per_layer"]:
                layers.add_row(str(row["layer"]), f"{row['error']:.4f}", f"{row['density']:.4f}")
            out.print(layers)
        if speed is not None:
            out.print(_speedup_line(speed))
    raise typer.Exit(0 if report.valid else 1)


def faithful_preset(workload: str) -> str:
    """The faithful preset for a faithful or fast-score preset name."""
    from evaluator.faithful.spec import faithful_preset_for

    try:
        return faithful_preset_for(workload)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def faithful_report(file: Path, preset: str, target: float, in_process: bool, limits):
    from evaluator.faithful import faithful_score

    return faithful_score(file, preset, target, limits=limits, in_process=in_process)


def print_faithful(report, json_out: bool) -> None:
    data = report.to_dict()
    if json_out:
        print(json.dumps(data))
        return
    out.print(report_table(data, FAITHFUL_KEYS, title="faithful score (sparse decode in every layer)"))


def _speedup_line(speed) -> str:
    if not speed.measured:
        return f"decode speedup: not measured ({speed.error or speed.reason})"
    text = (f"decode speedup vs dense SDPA ({speed.device}, {speed.dtype}): {speed.speedup:.2f}x with {speed.layout} "
            f"(kv_density {speed.kv_density:.4f}); per-query-head lists {speed.overall_speedup:.2f}x overall, "
            f"{speed.mean_speedup:.2f}x mean over {speed.n_records} records ({speed.dense_us:.1f} us -> {speed.sparse_us:.1f} us)")
    if speed.overall_kv_speedup is not None:
        text += f"; one list per KV head (shared or the group's union) {speed.overall_kv_speedup:.2f}x"
    return text


def _evaluate(file: Path, wl, target: float, in_process: bool, limits):
    if in_process:
        from evaluator.inprocess import score_file

        return score_file(file, wl, target)
    from evaluator.sandbox import evaluate_in_sandbox

    return evaluate_in_sandbox(file, wl, target, limits=limits)
