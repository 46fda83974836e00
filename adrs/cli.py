"""The `adrs` command line: one function per command, the work lives in the modules they call."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Evolve sparse-attention maskers with an LLM, scored safely.",
)
console = Console(stderr=True)  # messages and errors
out = Console()  # results


class UserError(Exception):
    """A problem with the user's input: shown as one line, exit code 2."""


FAST_KEYS = ("valid", "combined_score", "error", "density", "density_penalty", "wall_s", "category", "reason", "workload")
FAITHFUL_KEYS = ("valid", "combined_score", "error", "density", "agreement", "kl", "kl_max", "needle_accuracy",
                 "dense_needle_accuracy", "n_calls", "wall_s", "candidate_s", "category", "reason", "spec")


def _cell(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _report_table(report: dict, keys: tuple[str, ...] = FAST_KEYS, title: str | None = None) -> Table:
    table = Table(show_header=False, box=None, title=title)
    for key in keys:
        if report.get(key) is not None:
            table.add_row(key, _cell(report[key]))
    if report.get("worst") and "sample" in report["worst"]:
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
    speedup: bool = typer.Option(False, "--speedup", help="also time its selections with the sparse-decode kernel vs dense SDPA (CUDA)"),
    faithful: bool = typer.Option(False, "--faithful", help="faithful score: the model decodes with the selections in every layer"),
) -> None:
    """Score one candidate file: fast (per-layer error on cached activations) or --faithful (a real sparse decode)."""
    from evaluator.sandbox import SandboxLimits
    from evaluator.speedup import score_with_speedup
    from evaluator.workload import load_workload

    if not file.is_file():
        raise UserError(f"no such candidate file: {file}")
    if faithful:
        report = _faithful(file, _faithful_preset(workload), target, in_process, SandboxLimits(wall_s=timeout))
        _print_faithful(report, json_out)
        raise typer.Exit(0 if report.valid else 1)
    try:
        wl = load_workload(workload, progress=not json_out)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    limits = SandboxLimits(wall_s=timeout)
    if speedup:
        report, speed = score_with_speedup(file, wl, target, sandbox=not in_process, limits=limits)
    else:
        report, speed = _evaluate(file, wl, target, in_process, limits), None
    data = report.to_dict()
    if json_out:
        print(json.dumps(data | ({"speedup": speed.to_dict()} if speed is not None else {})))
    else:
        out.print(_report_table(data))
        if data.get("per_layer"):
            layers = Table("layer", "error", "density", title="per layer")
            for row in data["per_layer"]:
                layers.add_row(str(row["layer"]), f"{row['error']:.4f}", f"{row['density']:.4f}")
            out.print(layers)
        if speed is not None:
            out.print(_speedup_line(speed))
    raise typer.Exit(0 if report.valid else 1)


def _faithful_preset(workload: str) -> str:
    """The faithful preset for a faithful or fast-score preset name."""
    from evaluator.faithful.spec import faithful_preset_for

    try:
        return faithful_preset_for(workload)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _faithful(file: Path, preset: str, target: float, in_process: bool, limits):
    from evaluator.faithful import faithful_score

    return faithful_score(file, preset, target, limits=limits, in_process=in_process)


def _print_faithful(report, json_out: bool) -> None:
    data = report.to_dict()
    if json_out:
        print(json.dumps(data))
        return
    out.print(_report_table(data, FAITHFUL_KEYS, title="faithful score (sparse decode in every layer)"))


def _speedup_line(speed) -> str:
    if not speed.measured:
        return f"decode speedup: not measured ({speed.error or speed.reason})"
    text = (f"decode speedup vs dense SDPA ({speed.device}, {speed.dtype}): {speed.overall_speedup:.2f}x overall, "
            f"{speed.mean_speedup:.2f}x mean over {speed.n_records} records ({speed.dense_us:.1f} us -> {speed.sparse_us:.1f} us)")
    if speed.overall_kv_speedup is not None:
        text += f"; {speed.overall_kv_speedup:.2f}x with one index list per KV head"
    return text


def _evaluate(file: Path, wl, target: float, in_process: bool, limits):
    if in_process:
        from evaluator.inprocess import score_file

        return score_file(file, wl, target)
    from evaluator.sandbox import evaluate_in_sandbox

    return evaluate_in_sandbox(file, wl, target, limits=limits)


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
    view = {"stats": LoopStats(), "done": 0}
    with Live(render(LoopStats(), lines, total, 0), console=out, refresh_per_second=4, transient=False) as live:
        def on_event(event: dict) -> None:
            if event["kind"] == "candidate":
                lines.append(candidate_line(event))
                view.update(stats=event["stats"], done=event["ref"].iteration + 1)
            else:
                lines.append(event.get("message", ""))
            live.update(render(view["stats"], lines, total, view["done"]))
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
    llm: Optional[str] = typer.Option(None, help="'offline' or 'structural' to use an LLM-free mutator"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="evaluate on this Ray cluster (sets executor: ray)"),
) -> None:
    """Start an evolution run."""
    import time as _time

    from adrs.config import ConfigError, load_config

    try:
        cfg = load_config(config)
        if llm is not None:
            if llm not in ("offline", "structural"):
                raise UserError("--llm accepts only 'offline' or 'structural'; configure endpoints in the config file")
            cfg = cfg.model_copy(update={"llm": llm})
    except ConfigError as exc:
        raise UserError(f"{config}: {exc}") from None
    cfg = _with_ray_address(cfg, ray_address)
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
           iterations: Optional[int] = typer.Option(None, help="override the total iteration count"),
           ray_address: Optional[str] = typer.Option(None, "--ray-address", help="evaluate on this Ray cluster")) -> None:
    """Continue a run from what was committed."""
    _evolve(run_dir, _with_ray_address(_run_config(run_dir), ray_address), iterations, Path.cwd())


def _with_ray_address(cfg, address: Optional[str]):
    """The config with evaluation on the Ray cluster at ``address`` (unchanged when None)."""
    if address is None:
        return cfg
    evaluation = cfg.evaluation.model_copy(update={"executor": "ray", "ray_address": address})
    return cfg.model_copy(update={"evaluation": evaluation})


def _run_config(run_dir: Path):
    from adrs.config import ConfigError, load_config

    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"not a run directory (no config.yaml): {run_dir}")
    try:
        return load_config(run_dir / "config.yaml")
    except ConfigError as exc:
        raise UserError(f"{run_dir / 'config.yaml'}: {exc}") from None


def _heldout_column(archive, rows: list, cfg) -> dict[str, tuple[float | None, bool | None]]:
    """Per row: held-out score, and whether its gain over the seed replicates there (None: unknown)."""
    from adrs.loop import heldout_of

    spec = cfg.heldout_spec() if cfg is not None else None
    if spec is None or not rows:
        return {r.id: (None, None) for r in rows}
    key = spec.content_hash()
    seed = archive.get(0)
    seed_held = heldout_of(archive, seed.id, key)
    found = {}
    for r in rows:
        held = heldout_of(archive, r.id, key)
        score = held.get("combined_score") if held and held.get("valid") else None
        replicates = None
        if score is not None and seed_held and seed_held.get("valid") and r.id != seed.id:
            if r.combined_score > seed.combined_score:
                replicates = score > seed_held["combined_score"]
        found[r.id] = (score, replicates)
    return found


@app.command()
def leaderboard(run_dir: Path = typer.Argument(...), top: int = typer.Option(10, "--top"),
                json_out: bool = typer.Option(False, "--json")) -> None:
    """Best candidates of a run, with held-out scores where known."""
    cfg = _run_config(run_dir) if (run_dir / "config.yaml").is_file() else None
    with _open(run_dir) as archive:
        rows = archive.leaderboard(top)
        held = _heldout_column(archive, rows, cfg)
        flagged = [r for r in archive.all() if r.status == "rejected"]
    if json_out:
        print(json.dumps([{**{k: getattr(r, k) for k in ("id", "iteration", "island", "status", "combined_score", "error",
                                                          "density", "author", "parent_id", "commit")},
                           "heldout_score": held[r.id][0], "replicates": held[r.id][1]} for r in rows]))
        return
    table = Table("id", "iter", "island", "score", "held-out", "error", "density", "author", "summary", title=str(run_dir),
                  caption="held-out: '-' = not scored there (adrs rescore); NO = beats the seed on search, not on held-out")
    for r in rows:
        score, replicates = held[r.id]
        held_text = "-" if score is None else f"{score:.5f}" + {True: "", False: " NO", None: ""}[replicates]
        table.add_row(r.id, str(r.iteration), str(r.island), f"{r.combined_score:.5f}", held_text, f"{r.error:.4f}",
                      f"{r.density:.4f}", r.author, (r.summary or "")[:50])
    out.print(table)
    if flagged:
        # Reasons can quote candidate output: Text cells are never parsed as markup.
        shown = sorted(flagged, key=lambda r: -(r.combined_score or float("-inf")))[:top]
        ftable = Table("id", "iter", "score", "why flagged", title="flagged: never best, never parent",
                       caption="numerics audit (float64 re-score), held-out cascade, or a reviewer's rejection")
        for r in shown:
            score = "-" if r.combined_score is None else f"{r.combined_score:.5f}"
            ftable.add_row(r.id, str(r.iteration), score, Text(r.reject_reason or ""))
        out.print(ftable)


def _edit_in_editor(code: str, name: str) -> str:
    """Open ``$VISUAL``/``$EDITOR`` on a copy of ``code``; the edited text."""
    import os
    import shlex
    import subprocess
    import tempfile

    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR")
    if not editor:
        raise UserError("set $EDITOR (or $VISUAL), or pass --file")
    with tempfile.TemporaryDirectory(prefix="adrs-patch-") as tmp:
        path = Path(tmp) / f"{name}.py"
        path.write_text(code)
        rc = subprocess.run([*shlex.split(editor), str(path)]).returncode
        if rc != 0:
            raise UserError(f"the editor exited with code {rc}; nothing committed")
        return path.read_text()


def _compare(old: dict, new: dict, old_label: str, new_label: str) -> Table:
    table = Table("", old_label, new_label)
    for key in ("valid", "combined_score", "error", "density", "category", "reason", "workload"):
        if old.get(key) is None and new.get(key) is None:
            continue
        table.add_row(key, *(_cell(d.get(key, "-")) for d in (old, new)))
    return table


@app.command()
def patch(
    run_dir: Path = typer.Argument(...),
    cand: str = typer.Argument(..., help="the candidate to edit (id, iteration, commit prefix or 'best')"),
    file: Optional[Path] = typer.Option(None, "--file", help="the edited candidate; default: open $EDITOR on a copy"),
    message: str = typer.Option("hand edit", "--message", "-m", help="what the edit does (the commit summary)"),
) -> None:
    """Hand-patch a candidate: score the edit and commit it as a human-authored child."""
    from adrs.evaluate import make_scorer
    from adrs.loop import Child, commit_child
    from adrs.mutation import MutationResult

    cfg = _run_config(run_dir)
    with _open(run_dir) as archive:
        parent = _get(archive, cand)
        old_code, old_record = archive.code(parent.id), archive.record(parent.id)
    if file is not None:
        if not file.is_file():
            raise UserError(f"no such file: {file}")
        code = file.read_text()
    else:
        code = _edit_in_editor(old_code, parent.id)
    if code == old_code:
        raise UserError("the code is unchanged; nothing committed")
    scorer = make_scorer(cfg)
    try:
        report = scorer.score(code)
        child = Child(parent.id, parent.island, code, report, MutationResult(code, None, "human", message))
        with _open(run_dir) as archive:
            ref, rejection = commit_child(archive, scorer, child, author="human", summary=f"patch: {message}")
    finally:
        scorer.close()
    out.print(f"committed [bold]{ref.id}[/bold] (iteration {ref.iteration}, child of {parent.id}, author human): {ref.status}")
    out.print(_compare(old_record, report.to_dict(), f"{parent.id} (parent)", f"{ref.id} (patched)"))
    if rejection:
        out.print(Text(f"flagged (never best, never parent): {rejection}"))
    raise typer.Exit(0 if report.valid else 1)


@app.command()
def rescore(
    run_dir: Path = typer.Argument(...),
    cand: str = typer.Argument(..., help="id, iteration, commit prefix or 'best'"),
    workload: Optional[str] = typer.Option(None, help="preset; default: the run's held-out workload, else its search one"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
    faithful: bool = typer.Option(False, "--faithful", help="faithful score (a real sparse decode) instead of the fast one"),
) -> None:
    """Score an archived candidate again (sandboxed, by default on the held-out workload) and keep the result."""
    from adrs.evaluate import CodeScorer
    from adrs.loop import rescore_entry
    from evaluator.workload import load_workload
    from evaluator.workload.spec import resolve_spec

    cfg = _run_config(run_dir)
    if faithful:
        _rescore_faithful(run_dir, cand, cfg, workload, json_out)
        return
    try:
        spec = resolve_spec(workload) if workload is not None else (cfg.heldout_spec() or cfg.workload_spec())
    except ValueError as exc:
        raise UserError(str(exc)) from None
    with _open(run_dir) as archive:
        ref = _get(archive, cand)
        code, old = archive.code(ref.id), archive.record(ref.id)
    scorer = CodeScorer(cfg, load_workload(spec, progress=not json_out))
    try:
        report = scorer.score(code)
    finally:
        scorer.close()
    with _open(run_dir) as archive:
        archive.add_rescore(ref.id, rescore_entry(report.to_dict(), scorer.workload.hash, "rescore"))
    if json_out:
        print(json.dumps({"id": ref.id, "search": {k: old.get(k) for k in ("valid", "combined_score", "error", "density", "workload")},
                          "rescore": report.to_dict()}))
    else:
        out.print(f"{ref.id} re-scored on {report.workload}; kept as a note beside the candidate")
        out.print(_compare(old, report.to_dict(), "search (archived)", "re-score"))
    raise typer.Exit(0 if report.valid else 1)


def _rescore_faithful(run_dir: Path, cand: str, cfg, workload: Optional[str], json_out: bool) -> None:
    from adrs.loop import rescore_entry
    from evaluator.candidate import candidate_file
    from evaluator.faithful.spec import resolve_faithful_spec
    from evaluator.sandbox import SandboxLimits

    if workload is None:
        held = cfg.heldout_workload
        workload = held if isinstance(held, str) else "faithful-heldout"
    preset = _faithful_preset(workload)
    with _open(run_dir) as archive:
        ref = _get(archive, cand)
        code = archive.code(ref.id)
    limits = SandboxLimits(wall_s=cfg.evaluation.timeout_s, memory_mb=cfg.evaluation.memory_mb)
    with candidate_file(code) as path:
        report = _faithful(path, preset, cfg.density_target, cfg.evaluation.in_process, limits)
    with _open(run_dir) as archive:
        entry = rescore_entry(report.to_dict(), resolve_faithful_spec(preset).content_hash(), "faithful")
        archive.add_rescore(ref.id, entry)
    if not json_out:
        out.print(f"{ref.id} faithfully re-scored on {report.spec}; kept as a note beside the candidate")
    _print_faithful(report, json_out)
    raise typer.Exit(0 if report.valid else 1)


@app.command()
def review(
    run_dir: Path = typer.Argument(...),
    action: str = typer.Argument("list", help="list | approve | reject | note"),
    text: Optional[str] = typer.Argument(None, help="reject: the reason; note: the note; approve: an optional note"),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", "-c", help="name or iteration; default: the oldest pending"),
    json_out: bool = typer.Option(False, "--json", help="list as JSON"),
) -> None:
    """Review checkpoints: list them, approve, reject with a reason, or leave a note for the next prompts."""
    from adrs import review as rv

    if action not in ("list", "approve", "reject", "note"):
        raise UserError(f"unknown review action {action!r}: use list, approve, reject or note")
    with _open(run_dir) as archive:
        if action == "list":
            every = rv.checkpoints(archive)
            if json_out:
                print(json.dumps([{"name": c.name, "iteration": c.iteration, "candidate": c.candidate_id, "reason": c.reason,
                                   "decision": c.decision, "notes": list(c.notes)} for c in every]))
                return
            table = Table("checkpoint", "candidate", "why", "decision", "notes", title=f"review: {run_dir}")
            for c in every:
                table.add_row(c.name, c.candidate_id, c.reason, c.decision or "[bold yellow]pending[/]", "\n".join(c.notes))
            out.print(table if every else "no checkpoints yet (config: review.every / review.on_new_best)")
            waiting = [c for c in every if c.pending]
            if waiting:
                out.print(f"{len(waiting)} pending. Decide with: adrs review {run_dir} approve | reject REASON | note TEXT")
            return
        try:
            target = rv.resolve(archive, checkpoint)
            done = rv.decide(archive, target, action, text or "")
        except (LookupError, ValueError) as exc:
            raise UserError(str(exc)) from None
    what = {"note": "note added to", "approve": "approved", "reject": "rejected"}[action]
    out.print(f"{what} {done.name} ({done.candidate_id})" + (f": {text}" if text else ""))


@app.command()
def plot(run_dir: Path = typer.Argument(...),
         output: Optional[Path] = typer.Option(None, "--out", help="PNG path; default: RUN_DIR/progress.png")) -> None:
    """PNG of the run: score against iteration, error against density, lineage of the best."""
    from adrs.plot import plot_run

    cfg = _run_config(run_dir)
    with _open(run_dir) as archive:
        path = plot_run(archive, output or run_dir / "progress.png", cfg.density_target)
    out.print(f"wrote {path}")


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
