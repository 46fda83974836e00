"""Adding to a run by hand: `adrs patch` (a human-authored child) and `adrs rescore` (a re-score note)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from adrs.cli.common import (
    UserError, cand_arg, command, compare_table, get_candidate, open_archive, out, run_config, run_dir_arg,
)
from adrs.cli.score import faithful_preset, faithful_report, print_faithful
from adrs.safetext import terminal_safe

EXIT_REJECTED = 3  # scored and committed, but the held-out check rejected it


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


def check_candidate_source(code: str, where: str) -> None:
    """Refuse, before any scoring, code that cannot be a candidate: a syntax error or broken EVOLVE markers."""
    from evaluator.candidate import CandidateFormatError, compile_tree, parse_source, split_candidate

    try:
        compile_tree(parse_source(code), where)
    except SyntaxError as exc:
        raise UserError(f"{where}: syntax error at line {exc.lineno}: {exc.msg}; nothing committed") from None
    try:
        split_candidate(code)
    except CandidateFormatError as exc:
        raise UserError(f"{where}: {exc}; nothing committed") from None


@command()
def patch(
    run_dir: Path = run_dir_arg(),
    cand: str = cand_arg("the candidate to edit (id, iteration, commit prefix or 'best')"),
    file: Optional[Path] = typer.Option(None, "--file", help="the edited candidate; default: open $EDITOR on a copy"),
    message: str = typer.Option("hand edit", "--message", "-m", help="what the edit does (the commit summary)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="score the edit and show it beside its parent; commit nothing"),
) -> None:
    """Hand-patch a candidate: check and score the edit, then commit it as a human-authored child.

    Exit code: 0 committed and valid, 1 invalid (committed as a failed candidate),
    2 bad input (nothing committed), 3 committed but rejected by the held-out check.
    """
    from adrs.evaluate import make_scorer
    from adrs.commit import Child, commit_child
    from adrs.mutation import MutationResult

    cfg = run_config(run_dir)
    with open_archive(run_dir) as archive:
        parent = get_candidate(archive, cand, run_dir)
        old_code, old_record = archive.code(parent.id), archive.record(parent.id)
    if file is not None:
        if not file.is_file():
            raise UserError(f"no such file: {file}")
        code = file.read_text()
    else:
        code = _edit_in_editor(old_code, parent.id)
    if code == old_code:
        raise UserError("the code is unchanged; nothing committed")
    check_candidate_source(code, str(file) if file is not None else "the edit")
    scorer = make_scorer(cfg)
    try:
        report = scorer.score(code)
        if dry_run:
            out.print(f"dry run: {parent.id} edited, not committed: {'valid' if report.valid else 'invalid'}")
            out.print(compare_table(old_record, report.to_dict(), f"{parent.id} (parent)", "edit (not committed)"))
            raise typer.Exit(0 if report.valid else 1)
        child = Child(parent.id, parent.island, code, report, MutationResult(code, None, "human", message))
        with open_archive(run_dir) as archive:
            ref, rejection = commit_child(archive, scorer, child, author="human", summary=f"patch: {message}")
    finally:
        scorer.close()
    out.print(f"committed [bold]{ref.id}[/bold] (iteration {ref.iteration}, child of {parent.id}, author human): {ref.status}")
    out.print(compare_table(old_record, report.to_dict(), f"{parent.id} (parent)", f"{ref.id} (patched)"))
    if rejection:
        out.print(f"flagged (never best, never parent): {terminal_safe(rejection)}")
        raise typer.Exit(EXIT_REJECTED)
    raise typer.Exit(0 if report.valid else 1)


@command()
def rescore(
    run_dir: Path = run_dir_arg(),
    cand: str = cand_arg(),
    workload: Optional[str] = typer.Option(None, help="preset; default: the run's held-out workload, else its search one"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
    faithful: bool = typer.Option(False, "--faithful", help="faithful score (a real sparse decode) instead of the fast one"),
) -> None:
    """Score an archived candidate again (sandboxed, by default on the held-out workload) and keep the result."""
    from adrs.evaluate import CodeScorer
    from adrs.commit import rescore_entry
    from evaluator.workload import load_workload
    from evaluator.workload.spec import resolve_spec

    cfg = run_config(run_dir)
    if faithful:
        _rescore_faithful(run_dir, cand, cfg, workload, json_out)
        return
    try:
        spec = resolve_spec(workload) if workload is not None else (cfg.heldout_spec() or cfg.workload_spec())
    except ValueError as exc:
        raise UserError(str(exc)) from None
    with open_archive(run_dir) as archive:
        ref = get_candidate(archive, cand, run_dir)
        code, old = archive.code(ref.id), archive.record(ref.id)
    scorer = CodeScorer(cfg, load_workload(spec, progress=not json_out))
    try:
        report = scorer.score(code)
    finally:
        scorer.close()
    with open_archive(run_dir) as archive:
        archive.add_rescore(ref.id, rescore_entry(report.to_dict(), scorer.workload.hash, "rescore"))
    if json_out:
        print(json.dumps({"id": ref.id, "search": {k: old.get(k) for k in ("valid", "combined_score", "error", "density", "workload")},
                          "rescore": report.to_dict()}))
    else:
        out.print(f"{ref.id} re-scored on {report.workload}; kept as a note beside the candidate")
        out.print(compare_table(old, report.to_dict(), "search (archived)", "re-score"))
    raise typer.Exit(0 if report.valid else 1)


def _rescore_faithful(run_dir: Path, cand: str, cfg, workload: Optional[str], json_out: bool) -> None:
    from adrs.commit import rescore_entry
    from adrs.scheduler import sandbox_limits
    from evaluator.candidate import candidate_file
    from evaluator.faithful.spec import resolve_faithful_spec

    if workload is None:
        held = cfg.heldout_workload
        workload = held if isinstance(held, str) else "faithful-heldout"
    preset = faithful_preset(workload)
    with open_archive(run_dir) as archive:
        ref = get_candidate(archive, cand, run_dir)
        code = archive.code(ref.id)
    limits = sandbox_limits(cfg)
    with candidate_file(code) as path:
        report = faithful_report(path, preset, cfg.density_target, cfg.evaluation.in_process, limits)
    with open_archive(run_dir) as archive:
        entry = rescore_entry(report.to_dict(), resolve_faithful_spec(preset).content_hash(), "faithful")
        archive.add_rescore(ref.id, entry)
    if not json_out:
        out.print(f"{ref.id} faithfully re-scored on {report.spec}; kept as a note beside the candidate")
    print_faithful(report, json_out)
    raise typer.Exit(0 if report.valid else 1)
