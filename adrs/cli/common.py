"""What every command shares: the typer app, the two consoles, user errors, opening runs and candidates."""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable

import typer
from rich.console import Console
from rich.table import Table

from adrs.safetext import terminal_safe

# Plain (click) help: no `<bool>` after flags, no box drawing, readable at 80 columns and piped.
app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Evolve sparse-attention maskers with an LLM, scored safely.",
)
console = Console(stderr=True)  # messages and errors
out = Console()  # results

CAND_HELP = "candidate: id (c000012), iteration (12), commit prefix, or 'best'"
RUN_DIR_HELP = "run directory (holds config.yaml and repo/)"


class UserError(Exception):
    """A problem with the user's input: shown as one line, exit code 2."""


class Interrupted(Exception):
    """Ctrl-C, turned into one line for the user (exit code 130)."""


def command(on_interrupt: Callable[..., str] | None = None) -> Callable[[Callable], Callable]:
    """``app.command`` whose Ctrl-C becomes :class:`Interrupted` (typer would exit 130 silently).

    ``on_interrupt`` (called with the command's arguments) words the line, e.g. a resume hint.
    """
    def register(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapped(*a: Any, **k: Any) -> Any:
            try:
                return fn(*a, **k)
            except KeyboardInterrupt:
                raise Interrupted(on_interrupt(**k) if on_interrupt else "interrupted") from None
        app.command()(wrapped)
        return fn
    return register


def run_dir_arg() -> Any:
    return typer.Argument(..., help=RUN_DIR_HELP, metavar="RUN_DIR", show_default=False)


def cand_arg(help: str = CAND_HELP) -> Any:
    return typer.Argument(..., help=help, metavar="CAND", show_default=False)


def cell(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, float) else terminal_safe(value)


FAST_KEYS = ("valid", "combined_score", "error", "density", "kv_density", "density_penalty", "speedup", "speedup_penalty",
             "wall_s", "category", "reason", "workload", "isolation")


def report_table(report: dict, keys: tuple[str, ...] = FAST_KEYS, title: str | None = None) -> Table:
    table = Table(show_header=False, box=None, title=title)
    for key in keys:
        if report.get(key) is not None:
            table.add_row(key, cell(report[key]))
    if report.get("worst") and "sample" in report["worst"]:
        w = report["worst"]
        table.add_row("worst record", f"sample {w['sample']} layer {w['layer']}: error {w['error']:.4g}")
    return table


def compare_table(old: dict, new: dict, old_label: str, new_label: str) -> Table:
    table = Table("", old_label, new_label)
    for key in ("valid", "combined_score", "error", "density", "kv_density", "speedup", "category", "reason", "workload"):
        if old.get(key) is None and new.get(key) is None:
            continue
        table.add_row(key, *(cell(d.get(key, "-")) for d in (old, new)))
    return table


def check_run_dir(run_dir: Path) -> None:
    if not (run_dir / "repo").is_dir():
        raise UserError(f"not a run directory: {run_dir}")


def writable(run_dir: Path) -> bool:
    """Whether this process may take the run's write lock (a colleague's run may be read-only)."""
    lock = run_dir / "archive.lock"
    return os.access(run_dir, os.W_OK | os.X_OK) and (not lock.exists() or os.access(lock, os.W_OK))


def open_archive(run_dir: Path):
    """The run's archive, for commands that write to it."""
    from adrs.archive import open_run

    check_run_dir(run_dir)
    if not writable(run_dir):
        raise UserError(f"{run_dir} is read-only for you; this command writes to the run "
                        "(leaderboard, show, diff, plot and export only read)")
    return open_run(run_dir)


def open_for_reading(run_dir: Path):
    """The run's archive for a read-only command: without the write lock where the run is not ours to write."""
    from adrs.archive import open_run
    from adrs.archive.store import open_run_readonly

    check_run_dir(run_dir)
    return open_run(run_dir) if writable(run_dir) else open_run_readonly(run_dir)


def get_candidate(archive, cand: str, run_dir: Path):
    """The candidate ``cand`` names, or a one-line user error."""
    try:
        return archive.get(int(cand) if cand.isdigit() else cand)
    except (KeyError, LookupError) as exc:
        why = exc.args[0] if exc.args else ""
        kind = "ambiguous" if str(why).startswith("ambiguous") else "unknown"
        raise UserError(f"{kind} candidate {cand!r} in {run_dir}: give an id (c000012), an iteration, "
                        f"a longer commit prefix or 'best'; `adrs leaderboard {run_dir} --all` lists them") from None


def run_config(run_dir: Path):
    """The run's resolved config.yaml."""
    from adrs.config import ConfigError, load_config

    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"not a run directory (no config.yaml): {run_dir}")
    try:
        return load_config(run_dir / "config.yaml")
    except ConfigError as exc:
        raise UserError(f"{run_dir / 'config.yaml'}: {exc}") from None
