"""The `adrs` command line: one function per command, the work lives in the modules they call."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Evolve sparse-attention maskers with an LLM, scored safely.",
)
console = Console(stderr=True)  # messages and errors
out = Console()  # results


class UserError(Exception):
    """A problem with the user's input: shown as one line, exit code 2."""


def _report_table(report: dict) -> Table:
    table = Table(show_header=False, box=None)
    for key in ("valid", "combined_score", "error", "density", "density_penalty", "wall_s", "category", "reason", "workload"):
        if report.get(key) is not None:
            value = report[key]
            table.add_row(key, f"{value:.6g}" if isinstance(value, float) else str(value))
    if report.get("worst"):
        w = report["worst"]
        table.add_row("worst record", f"sample {w['sample']} layer {w['layer']}: error {w['error']:.4g}")
    return table


@app.command()
def score(
    file: Path = typer.Argument(..., help="candidate file (Python, with an EVOLVE block)"),
    workload: str = typer.Option("default", help="workload preset name"),
    target: float = typer.Option(0.10, help="density target"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
    in_process: bool = typer.Option(False, "--in-process", help="run the candidate in this process (trusted code only)"),
    timeout: float = typer.Option(300.0, help="wall-time limit for the candidate, seconds"),
) -> None:
    """Score one candidate file on a workload (fast score: per-layer error on cached activations)."""
    from evaluator.workload import load_workload

    if not file.is_file():
        raise UserError(f"no such candidate file: {file}")
    try:
        wl = load_workload(workload, progress=not json_out)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    report = _evaluate(file, wl, target, in_process, timeout)
    data = report.to_dict()
    if json_out:
        print(json.dumps(data))
    else:
        out.print(_report_table(data))
        if data.get("per_layer"):
            layers = Table("layer", "error", "density", title="per layer")
            for row in data["per_layer"]:
                layers.add_row(str(row["layer"]), f"{row['error']:.4f}", f"{row['density']:.4f}")
            out.print(layers)
    raise typer.Exit(0 if report.valid else 1)


def _evaluate(file: Path, wl, target: float, in_process: bool, timeout: float):
    if in_process:
        from evaluator.inprocess import score_file

        return score_file(file, wl, target)
    from evaluator.sandbox import SandboxLimits, evaluate_in_sandbox

    return evaluate_in_sandbox(file, wl, target, limits=SandboxLimits(wall_s=timeout))


@app.callback()
def _root() -> None:
    """Evolve sparse-attention maskers with an LLM, scored safely. Add --debug for tracebacks."""


def main() -> None:
    """Console entry point: user errors print one line (exit 2); --debug shows tracebacks."""
    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
    try:
        app()
    except (UserError, FileNotFoundError, ModuleNotFoundError, NotADirectoryError) as exc:
        if debug:
            raise
        console.print(f"[red]error:[/red] {exc}")
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - one line for the user, the traceback behind --debug
        if debug:
            raise
        console.print(f"[red]error:[/red] {type(exc).__name__}: {exc} (run with --debug for the traceback)")
        sys.exit(1)


if __name__ == "__main__":
    main()
