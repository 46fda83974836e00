"""Starting and continuing runs: `adrs run`, `adrs agent`, `adrs resume`, and `adrs init` for a first config."""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any, Coroutine, Optional

import typer

from adrs.cli.common import Interrupted, UserError, command, console, out, run_config, run_dir_arg

RUN_DIR_OPTION_HELP = "where the run lives (created; must not hold a run yet); default: runs/<name>-<timestamp>"


def _run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` to completion on a fresh event loop.

    Unlike ``asyncio.run``, a Ctrl-C does not wait for executor threads (a candidate being
    scored can take minutes): the KeyboardInterrupt reaches the caller at once.
    """
    loop = asyncio.new_event_loop()
    try:
        result = loop.run_until_complete(coro)
        loop.run_until_complete(loop.shutdown_default_executor())
        return result
    finally:
        loop.close()  # does not join executor threads still running


def resume_hint(run_dir: Path, **_: Any) -> str:
    return f"stopped; everything committed is kept. Resume with: adrs resume {run_dir}"


def _run_hint(run_dir: Optional[Path] = None, **_: Any) -> str:
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        return resume_hint(run_dir)
    return "interrupted before the run started; nothing to resume"


def evolve_with_view(run_dir: Path, cfg, base: Path) -> None:
    """The population loop under the live view; a Ctrl-C anywhere ends with the resume hint, printed last."""
    from rich.live import Live

    from adrs.display import candidate_line, render
    from adrs.evaluate import make_scorer, speedup_note
    from adrs.loop import LoopStats, evolve

    total = 1 + cfg.iterations
    note = speedup_note(cfg)  # objective: speedup without a GPU stops here, before anything is captured
    lines: list[str] = [note] if note else []
    view: dict[str, Any] = {"stats": LoopStats(), "done": 0}
    scorer = None
    try:
        # The live view stops (drawing its last frame) before anything below prints: a message
        # printed while it runs would be drawn over.
        with Live(render(LoopStats(), lines, total, 0), console=out, refresh_per_second=4, transient=False) as live:
            def on_event(event: dict) -> None:
                if event["kind"] == "candidate":
                    lines.append(candidate_line(event))
                    view.update(stats=event["stats"], done=event["ref"].iteration + 1)
                elif event["kind"] == "started":
                    view.update(stats=event["stats"], done=event["done"])
                elif event["kind"] == "finished":
                    view.update(stats=event["stats"])
                else:
                    lines.append(event.get("message", ""))
                live.update(render(view["stats"], lines, total, view["done"]))

            scorer = make_scorer(cfg)
            _run_async(evolve(run_dir, cfg, scorer, on_event=on_event, base=base))
    except KeyboardInterrupt:
        out.line()  # the view's last frame ends without a newline
        raise Interrupted(resume_hint(run_dir)) from None
    except BaseException:
        if scorer is not None:
            scorer.close()
        raise
    try:
        scorer.close()
    except KeyboardInterrupt:
        raise Interrupted(resume_hint(run_dir)) from None
    out.print(f"\ndone. {_spend_line(run_dir)}Leaderboard: adrs leaderboard {run_dir}")


def _spend_line(run_dir: Path) -> str:
    """The run's LLM spend and a newline; empty for a run without LLM calls (offline)."""
    from adrs.archive import open_run
    from adrs.spend import run_spend

    with open_run(run_dir) as archive:
        spend = run_spend(archive)
    return spend.line() + "\n" if spend.total.calls else ""


def _find_seed(seed: Path, config: Path) -> Path:
    """The seed file: absolute, else next to the config, in the cwd, or in this checkout's seeds."""
    repo = Path(__file__).resolve().parents[2]
    for candidate in ([seed] if seed.is_absolute() else [config.resolve().parent / seed, Path.cwd() / seed, repo / seed]):
        if candidate.is_file():
            return candidate.resolve()
    raise UserError(f"seed_candidate not found: {seed}")


def write_resolved_config(run_dir: Path, cfg) -> None:
    """Write config.yaml atomically before anything else, so a run killed at once can resume."""
    from adrs.config import dump_config

    try:
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # prompts, code, scores: the user's own
        tmp = run_dir / "config.yaml.tmp"
        tmp.write_text(dump_config(cfg))
        os.replace(tmp, run_dir / "config.yaml")
    except OSError as exc:
        raise UserError(f"cannot write the run directory {run_dir}: {exc.strerror or exc}") from None


def _check_new_run_dir(run_dir: Path) -> None:
    """A clear line for a --run-dir that cannot hold a new run."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir} is a file, not a directory")
    if (run_dir / "config.yaml").exists():
        raise UserError(f"{run_dir} already holds a run; use `adrs resume {run_dir}`")
    existing = next((p for p in [run_dir, *run_dir.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserError(f"--run-dir {run_dir}: {existing} is a file, not a directory")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--run-dir {run_dir}: {existing} is not writable for you")


def prepare(config: Path, run_dir: Optional[Path], llm: Optional[str] = None, iterations: Optional[int] = None):
    """Load the config, resolve its seed, pick the run directory (checked, not yet created)."""
    from adrs.config import ConfigError, load_config

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise UserError(f"{config}: {exc}") from None
    if llm is not None:
        if llm not in ("offline", "structural"):
            raise UserError("--llm accepts only 'offline' or 'structural'; configure endpoints in the config file")
        cfg = cfg.model_copy(update={"llm": llm})
    if iterations is not None:  # kept in the run's config.yaml, so `adrs resume` goes on to the same total
        cfg = cfg.model_copy(update={"iterations": iterations})
    cfg = cfg.model_copy(update={"seed_candidate": str(_find_seed(Path(cfg.seed_candidate), config))})
    if run_dir is None:
        run_dir = Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    _check_new_run_dir(run_dir)
    return cfg, run_dir


def with_ray_address(cfg, address: Optional[str]):
    """The config with evaluation on the Ray cluster at ``address`` (unchanged when None)."""
    if address is None:
        return cfg
    evaluation = cfg.evaluation.model_copy(update={"executor": "ray", "ray_address": address})
    return cfg.model_copy(update={"evaluation": evaluation})


@command(on_interrupt=_run_hint)
def run(
    config: Path = typer.Argument(..., help="YAML run config (see `adrs init`)", metavar="CONFIG", show_default=False),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help=RUN_DIR_OPTION_HELP),
    iterations: Optional[int] = typer.Option(None, min=0, help="candidates to add after the seed (overrides the config; resume keeps it)"),
    llm: Optional[str] = typer.Option(None, help="'offline' (constant tuning) or 'structural' (program search): an LLM-free mutator"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="evaluate on this Ray cluster (sets executor: ray)"),
) -> None:
    """Start an evolution run (Ctrl-C stops it; `adrs resume` continues)."""
    cfg, run_dir = prepare(config, run_dir, llm, iterations)
    cfg = with_ray_address(cfg, ray_address)
    write_resolved_config(run_dir, cfg)
    console.print(f"run directory: {run_dir}")
    evolve_with_view(run_dir, cfg, config.resolve().parent)


@command(on_interrupt=_run_hint)
def agent(
    config: Path = typer.Argument(..., help="YAML run config with an `llm:` endpoint; `agent:` sets its budgets",
                                  metavar="CONFIG", show_default=False),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help=RUN_DIR_OPTION_HELP),
    turns: Optional[int] = typer.Option(None, "--turns", min=1, help="override agent.max_turns (total turns of the conversation)"),
) -> None:
    """Start an agent session: one tool-using LLM conversation that edits, scores and commits candidates."""
    from adrs.agent.command import run_session

    cfg, run_dir = prepare(config, run_dir)
    if cfg.llm in ("offline", "structural"):
        raise UserError(f"{config}: agent mode needs an LLM endpoint (`llm:` with models), not '{cfg.llm}'")
    write_resolved_config(run_dir, cfg)
    console.print(f"run directory: {run_dir}")
    raise typer.Exit(run_session(run_dir, cfg, turns, config.resolve().parent, out))


@command(on_interrupt=resume_hint)
def resume(run_dir: Path = run_dir_arg(),
           iterations: Optional[int] = typer.Option(
               None, min=0, help="candidates after the seed, in total (default: as the run was started; kept for later resumes)"),
           turns: Optional[int] = typer.Option(None, "--turns", min=1, help="agent runs: override the total turn budget"),
           ray_address: Optional[str] = typer.Option(None, "--ray-address", help="evaluate on this Ray cluster")) -> None:
    """Continue a run (a loop or an agent session) from what was committed."""
    from adrs.agent.transcript import is_agent_run

    cfg = run_config(run_dir)
    if iterations is not None and iterations != cfg.iterations:
        cfg = cfg.model_copy(update={"iterations": iterations})
        write_resolved_config(run_dir, cfg)
    cfg = with_ray_address(cfg, ray_address)
    if is_agent_run(run_dir):
        from adrs.agent.command import run_session

        raise typer.Exit(run_session(run_dir, cfg, turns, Path.cwd(), out))
    evolve_with_view(run_dir, cfg, Path.cwd())


@command()
def init(path: Path = typer.Argument(Path("adrs.yaml"), help="where to write the example config", metavar="PATH")) -> None:
    """Write a commented example config."""
    if path.exists():
        raise UserError(f"{path} exists; not overwriting")
    example = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"
    path.write_text(example.read_text())
    console.print(f"wrote {path}; start with: adrs run {path}")
