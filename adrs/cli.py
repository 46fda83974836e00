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


def _open(run_dir: Path):
    from adrs.archive import open_run

    if not (run_dir / "repo").is_dir():
        raise UserError(f"not a run directory: {run_dir}")
    return open_run(run_dir)


def _get(archive, cand: str):
    from adrs.archive.store import ArchiveError

    try:
        return archive.get(int(cand) if cand.isdigit() else cand)
    except (ArchiveError, KeyError, LookupError) as exc:
        raise UserError(f"unknown candidate {cand!r}: {exc}") from None


def _evolve(run_dir: Path, cfg, iterations: Optional[int], base: Path) -> None:
    import asyncio

    from rich.live import Live

    from adrs.display import candidate_line, render
    from adrs.evaluate import make_scorer
    from adrs.loop import LoopStats, evolve

    scorer = make_scorer(cfg)
    total = 1 + (cfg.iterations if iterations is None else iterations)
    lines: list[str] = []
    with Live(render(LoopStats(), lines, total, 0), console=out, refresh_per_second=4, transient=False) as live:
        def on_event(event: dict) -> None:
            if event["kind"] == "candidate":
                lines.append(candidate_line(event))
                live.update(render(event["stats"], lines, total, event["ref"].iteration + 1))
            else:
                lines.append(event.get("message", ""))
        try:
            asyncio.run(evolve(run_dir, cfg, scorer, iterations=iterations, on_event=on_event, base=base))
        except KeyboardInterrupt:
            console.print(f"stopped; everything committed is kept. Resume with: adrs resume {run_dir}")
            raise typer.Exit(130)
        finally:
            scorer.close()
    out.print(f"\ndone. Leaderboard: adrs leaderboard {run_dir}")


def _find_seed(seed: Path, config: Path) -> Path:
    """The seed file: absolute, else next to the config, in the cwd, or in this checkout's seeds."""
    repo = Path(__file__).resolve().parents[1]
    for candidate in ([seed] if seed.is_absolute() else [config.resolve().parent / seed, Path.cwd() / seed, repo / seed]):
        if candidate.is_file():
            return candidate.resolve()
    raise UserError(f"seed_candidate not found: {seed}")


def _write_resolved_config(run_dir: Path, cfg) -> None:
    """Write config.yaml atomically before anything else, so a run killed at once can resume."""
    import os

    from adrs.config import dump_config

    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "config.yaml.tmp"
    tmp.write_text(dump_config(cfg))
    os.replace(tmp, run_dir / "config.yaml")


@app.command()
def run(
    config: Path = typer.Argument(..., help="YAML run config (see `adrs init`)"),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="default: runs/<name>-<timestamp>"),
    iterations: Optional[int] = typer.Option(None, help="override the config's iteration count"),
    llm: Optional[str] = typer.Option(None, help="'offline' to use the LLM-free mutator"),
) -> None:
    """Start an evolution run."""
    import time as _time

    from adrs.config import ConfigError, load_config

    try:
        cfg = load_config(config)
        if llm is not None:
            if llm != "offline":
                raise UserError("--llm accepts only 'offline'; configure endpoints in the config file")
            cfg = cfg.model_copy(update={"llm": "offline"})
    except ConfigError as exc:
        raise UserError(f"{config}: {exc}") from None
    cfg = cfg.model_copy(update={"seed_candidate": str(_find_seed(Path(cfg.seed_candidate), config))})
    if run_dir is None:
        run_dir = Path("runs") / f"{cfg.name}-{_time.strftime('%Y%m%d-%H%M%S')}"
    if (run_dir / "config.yaml").exists():
        raise UserError(f"{run_dir} already holds a run; use `adrs resume {run_dir}`")
    _write_resolved_config(run_dir, cfg)
    console.print(f"run directory: {run_dir}")
    _evolve(run_dir, cfg, iterations, config.resolve().parent)


@app.command()
def resume(run_dir: Path = typer.Argument(..., help="run directory"),
           iterations: Optional[int] = typer.Option(None, help="override the total iteration count")) -> None:
    """Continue a run from what was committed."""
    from adrs.config import ConfigError, load_config

    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"not a run directory (no config.yaml): {run_dir}")
    try:
        cfg = load_config(run_dir / "config.yaml")
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    _evolve(run_dir, cfg, iterations, Path.cwd())


@app.command()
def leaderboard(run_dir: Path = typer.Argument(...), top: int = typer.Option(10, "--top"),
                json_out: bool = typer.Option(False, "--json")) -> None:
    """Best candidates of a run."""
    with _open(run_dir) as archive:
        rows = archive.leaderboard(top)
    if json_out:
        print(json.dumps([{k: getattr(r, k) for k in ("id", "iteration", "island", "status", "combined_score", "error",
                                                       "density", "author", "parent_id", "commit")} for r in rows]))
        return
    table = Table("id", "iter", "island", "score", "error", "density", "author", "summary", title=str(run_dir))
    for r in rows:
        table.add_row(r.id, str(r.iteration), str(r.island), f"{r.combined_score:.5f}", f"{r.error:.4f}",
                      f"{r.density:.4f}", r.author, (r.summary or "")[:50])
    out.print(table)


@app.command()
def show(run_dir: Path = typer.Argument(...), cand: str = typer.Argument(..., help="id, iteration, commit prefix or 'best'")) -> None:
    """A candidate's code, its diff to the parent and its score breakdown."""
    with _open(run_dir) as archive:
        ref = _get(archive, cand)
        record = archive.record(ref.id)
        out.print(f"[bold]{ref.id}[/bold] iteration {ref.iteration}, island {ref.island}, {ref.status}, parent {ref.parent_id}, commit {ref.commit[:10]}")
        out.print(_report_table(record))
        out.rule("diff to parent")
        print(archive.diff(ref.id) or "(no parent)")
        out.rule("code")
        print(archive.code(ref.id))


@app.command()
def diff(run_dir: Path = typer.Argument(...), a: str = typer.Argument(...), b: str = typer.Argument(...)) -> None:
    """Diff between two candidates' code."""
    with _open(run_dir) as archive:
        ra, rb = _get(archive, a), _get(archive, b)
        text = archive.repo.git.diff(ra.commit, rb.commit, "--", "candidate.py")
    print(text or "(identical)")


@app.command()
def reindex(run_dir: Path = typer.Argument(...)) -> None:
    """Rebuild the SQLite index from git alone."""
    from adrs.archive import reindex as _reindex

    if not (run_dir / "repo").is_dir():
        raise UserError(f"not a run directory: {run_dir}")
    n = _reindex(run_dir)
    console.print(f"reindexed {n} candidates")


@app.command()
def init(path: Path = typer.Argument(Path("adrs.yaml"), help="where to write the example config")) -> None:
    """Write a commented example config."""
    if path.exists():
        raise UserError(f"{path} exists; not overwriting")
    example = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
    path.write_text(example.read_text())
    console.print(f"wrote {path}; start with: adrs run {path}")


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
