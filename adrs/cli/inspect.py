"""Reading a run: `adrs leaderboard`, `show`, `diff`, `plot`, `export`, `reindex`.

All but reindex only read, so they work on a run directory that is read-only for you (a
colleague's run): the archive is then opened without its write lock (see open_run_readonly).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from adrs.cli.columns import format_columns
from adrs.cli.common import (
    UserError, cand_arg, check_run_dir, command, console, get_candidate, open_for_reading, out, report_table,
    run_config, run_dir_arg, writable,
)
from adrs.safetext import terminal_safe

HELD_CAPTION = "held-out: '-' not scored there (adrs rescore); NO: beats the seed on search only"


def _heldout_column(archive, rows: list, cfg) -> dict[str, tuple[float | None, bool | None]]:
    """Per row: held-out score, and whether its gain over the seed replicates there (None: unknown)."""
    from adrs.commit import heldout_of

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
        if score is not None and seed_held and seed_held.get("valid") and r.id != seed.id and r.combined_score is not None:
            if r.combined_score > seed.combined_score:
                replicates = score > seed_held["combined_score"]
        found[r.id] = (score, replicates)
    return found


def _why(archive, ref) -> str:
    """Why a candidate is not in the running: its failure or its rejection."""
    if ref.status == "rejected":
        return f"rejected: {ref.reject_reason or ''}"
    if ref.status == "failed":
        reason = archive.record(ref.id).get("reason") or ""
        return f"{ref.category or 'failed'}: {reason}"
    return ""


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


@command()
def leaderboard(
    run_dir: Path = run_dir_arg(),
    top: int = typer.Option(10, "--top", min=1, help="how many rows"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON array"),
    every: bool = typer.Option(False, "--all", help="every candidate, failed and rejected ones too, with their reasons"),
    failed: bool = typer.Option(False, "--failed", help="only failed and rejected candidates, with their reasons"),
    island: Optional[int] = typer.Option(None, "--island", min=0, help="only this island's candidates"),
    islands: bool = typer.Option(False, "--islands", help="the best candidate of each island"),
) -> None:
    """Best candidates of a run, with held-out scores where known, and the run's LLM tokens and cost."""
    from adrs.spend import run_spend

    cfg = run_config(run_dir) if (run_dir / "config.yaml").is_file() else None
    with open_for_reading(run_dir) as archive:
        if islands:
            by_island: dict[int, object] = {}
            for r in archive.leaderboard(10**9, island=island):
                by_island.setdefault(r.island, r)
            rows = [by_island[k] for k in sorted(by_island)]
        elif failed:
            rows = [r for r in archive.all() if r.status != "valid" and (island is None or r.island == island)]
            rows = rows[-top:]
        else:
            rows = archive.leaderboard(top, island=island, include_failed=every)
        held = _heldout_column(archive, rows, cfg)
        why = {r.id: _why(archive, r) for r in rows}
        # Flagged (numerics audit, held-out cascade, reviewer): never best, never parent; listed with why.
        flagged = [] if (every or failed) else sorted(
            (r for r in archive.all() if r.status == "rejected" and (island is None or r.island == island)),
            key=lambda r: -(r.combined_score if r.combined_score is not None else float("-inf")))[:top]
        spend = run_spend(archive)
    if json_out:
        print(json.dumps([{**{k: getattr(r, k) for k in ("id", "iteration", "island", "status", "combined_score", "error",
                                                          "density", "kv_density", "speedup", "author", "parent_id",
                                                          "commit", "category")},
                           "reason": why[r.id] or None, "summary": r.summary,
                           "heldout_score": held[r.id][0], "replicates": held[r.id][1]} for r in rows]))
        return
    show_why = every or failed
    # The speedup column appears once some candidate has a measured one (evaluation.speedup).
    timed = any(r.speedup is not None for r in rows)
    headers = ["id", "iter", "isl", "score", "held-out", "error", "density", "kv dens", *(["speedup"] if timed else []),
               "author", *(["status", "reason / summary"] if show_why else ["summary"])]
    table = []
    for r in rows:
        score, replicates = held[r.id]
        held_text = _num(score, ".5f") + (" NO" if replicates is False else "")
        cells = [r.id, str(r.iteration), str(r.island), _num(r.combined_score, ".5f"), held_text, _num(r.error, ".4f"),
                 _num(r.density, ".4f"), _num(r.kv_density, ".4f"),
                 *([_num(r.speedup, ".2f") + ("x" if r.speedup is not None else "")] if timed else []), r.author]
        text = terminal_safe(why[r.id] or r.summary or "", markup=False)
        cells += [r.status, text] if show_why else [text]
        table.append(cells)
    title = f"{run_dir}: " + ("failed and rejected candidates" if failed else "best per island" if islands
                              else "every candidate" if every else f"top {top}") + (f", island {island}" if island is not None else "")
    print(terminal_safe(title, markup=False))
    if not rows:
        print("(no candidates)")
    width = out.width if out.is_terminal else None
    for line in format_columns(headers, table, width,
                               right=("iter", "isl", "score", "held-out", "error", "density", "kv dens", "speedup")):
        print(line)
    print(HELD_CAPTION)
    if flagged:
        print("flagged: never best, never parent (numerics audit, held-out cascade, or a reviewer's rejection)")
        for line in format_columns(["id", "iter", "score", "why flagged"],
                                   [[r.id, str(r.iteration), _num(r.combined_score, ".5f"),
                                     terminal_safe(r.reject_reason or "", markup=False)] for r in flagged],
                                   width, right=("iter", "score")):
            print(line)
    print(spend.line() if spend.total.calls else "LLM spend: none (no LLM calls: offline mutator or human patches)")


@command()
def show(run_dir: Path = run_dir_arg(), cand: str = cand_arg(),
         prompt: bool = typer.Option(False, "--prompt", help="print the prompt and reply that produced the candidate")) -> None:
    """A candidate's code, its diff to the parent and its score breakdown (or, with --prompt, its conversation)."""
    with open_for_reading(run_dir) as archive:
        ref = get_candidate(archive, cand, run_dir)
        record = archive.record(ref.id)
        if prompt:
            from adrs.agent.transcript import prompt_text

            text = prompt_text(record)
            if text is None:
                raise UserError(f"{ref.id} was not produced by an LLM (author {ref.author}); it has no prompt")
            print(text)  # plain print: the text quotes model and candidate output, never rich markup
            return
        out.print(f"[bold]{ref.id}[/bold] iteration {ref.iteration}, island {ref.island}, {ref.status}, "
                  f"author {ref.author}, parent {ref.parent_id}, commit {ref.commit[:10]}")
        if ref.status == "rejected":
            out.print(f"rejected: {terminal_safe(ref.reject_reason or '')}")
        out.print(report_table(record))
        out.rule("diff to parent")
        print(terminal_safe(archive.diff(ref.id) or "(no parent)", markup=False))
        out.rule("code")
        print(terminal_safe(archive.code(ref.id), markup=False))


def _per_layer(record: dict) -> dict[int, dict]:
    return {int(row["layer"]): row for row in record.get("per_layer") or []}


@command()
def diff(run_dir: Path = run_dir_arg(), a: str = cand_arg("first candidate (id, iteration, commit prefix or 'best')"),
         b: str = cand_arg("second candidate"),
         scores: bool = typer.Option(False, "--scores", help="per-layer error and density side by side, instead of the code diff"),
         json_out: bool = typer.Option(False, "--json", help="with --scores: one JSON object")) -> None:
    """Diff between two candidates: their code, or with --scores their per-layer error and density."""
    with open_for_reading(run_dir) as archive:
        ra, rb = get_candidate(archive, a, run_dir), get_candidate(archive, b, run_dir)
        if not scores:
            text = archive.repo.git.diff("--no-ext-diff", "--no-textconv", ra.commit, rb.commit, "--", "candidate.py")
            print(terminal_safe(text, markup=False) if text else "(identical)")
            return
        rec_a, rec_b = archive.record(ra.id), archive.record(rb.id)
    la, lb = _per_layer(rec_a), _per_layer(rec_b)
    layers = sorted(set(la) | set(lb))
    if json_out:
        print(json.dumps({"a": ra.id, "b": rb.id, "layers": [
            {"layer": i, "a": la.get(i), "b": lb.get(i)} for i in layers],
            "a_total": {k: rec_a.get(k) for k in ("combined_score", "error", "density")},
            "b_total": {k: rec_b.get(k) for k in ("combined_score", "error", "density")}}))
        return

    def pair(i: int, key: str) -> tuple[str, str, str]:
        x, y = la.get(i, {}).get(key), lb.get(i, {}).get(key)
        d = "-" if x is None or y is None else f"{y - x:+.4f}"
        return _num(x, ".4f"), _num(y, ".4f"), d

    headers = ["layer", f"err {ra.id}", f"err {rb.id}", "err diff", f"dens {ra.id}", f"dens {rb.id}", "dens diff"]
    rows = [[str(i), *pair(i, "error"), *pair(i, "density")] for i in layers]
    rows.append(["all", _num(rec_a.get("error"), ".4f"), _num(rec_b.get("error"), ".4f"),
                 "-" if rec_a.get("error") is None or rec_b.get("error") is None else f"{rec_b['error'] - rec_a['error']:+.4f}",
                 _num(rec_a.get("density"), ".4f"), _num(rec_b.get("density"), ".4f"),
                 "-" if rec_a.get("density") is None or rec_b.get("density") is None
                 else f"{rec_b['density'] - rec_a['density']:+.4f}"])
    if not layers:
        print(f"no per-layer scores (failed candidate?): {ra.id} {ra.status}, {rb.id} {rb.status}")
    for line in format_columns(headers, rows, right=tuple(headers)):
        print(line)
    print(f"score: {_num(rec_a.get('combined_score'), '.5f')} ({ra.id}) -> {_num(rec_b.get('combined_score'), '.5f')} ({rb.id}); "
          "diff = second minus first")


@command()
def plot(run_dir: Path = run_dir_arg(),
         output: Optional[Path] = typer.Option(None, "--out", "-o", help="PNG path; default: RUN_DIR/progress.png")) -> None:
    """PNG of the run: score against iteration, error against density, lineage of the best."""
    from adrs.plot import plot_run

    cfg = run_config(run_dir)
    path = output or run_dir / "progress.png"
    if output is None and not writable(run_dir):
        raise UserError(f"{run_dir} is read-only for you; write the plot elsewhere with --out FILE.png")
    with open_for_reading(run_dir) as archive:
        try:
            written = plot_run(archive, path, cfg.density_target)
        except PermissionError as exc:
            raise UserError(f"cannot write {path}: {exc.strerror}") from None
    out.print(f"wrote {written}")


@command()
def export(run_dir: Path = run_dir_arg(), cand: str = cand_arg(),
           output: Optional[Path] = typer.Option(None, "--out", "-o", help="file to write; default: stdout"),
           force: bool = typer.Option(False, "--force", help="overwrite an existing --out file")) -> None:
    """The candidate as one standalone file (contract helpers inlined, scores in a header): runs without adrs."""
    from adrs.export import standalone_masker

    with open_for_reading(run_dir) as archive:
        ref = get_candidate(archive, cand, run_dir)
        text = standalone_masker(archive.code(ref.id), archive.record(ref.id), ref, run_dir)
    if output is None:
        print(text, end="")
        return
    if output.exists() and not force:
        raise UserError(f"{output} exists; pass --force to overwrite")
    try:
        output.write_text(text)
    except OSError as exc:
        raise UserError(f"cannot write {output}: {exc.strerror or exc}") from None
    console.print(f"wrote {output} ({ref.id}, score {_num(ref.combined_score, '.5f')})")


@command()
def reindex(run_dir: Path = run_dir_arg()) -> None:
    """Rebuild the SQLite index from git alone."""
    from adrs.archive import reindex as _reindex

    check_run_dir(run_dir)
    if not writable(run_dir):
        raise UserError(f"{run_dir} is read-only for you; reindex writes index.sqlite")
    n = _reindex(run_dir)
    console.print(f"reindexed {n} candidates")
