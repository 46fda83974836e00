"""`adrs review`: list checkpoints, approve, reject with a reason, or leave a note for the next prompts."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from adrs.cli.common import UserError, command, open_archive, open_for_reading, out, run_dir_arg
from adrs.safetext import terminal_safe


@command()
def review(
    run_dir: Path = run_dir_arg(),
    action: str = typer.Argument("list", help="list | approve | reject | note", metavar="ACTION"),
    text: Optional[str] = typer.Argument(None, help="reject: the reason; note: the note; approve: an optional note",
                                         metavar="TEXT", show_default=False),
    checkpoint: Optional[str] = typer.Option(
        None, "--checkpoint", "-c",
        help="name or iteration; default: the oldest pending (a note: the newest checkpoint when none is pending)"),
    json_out: bool = typer.Option(False, "--json", help="list as JSON"),
) -> None:
    """Review checkpoints: list them, approve, reject with a reason, or leave a note for the next prompts."""
    from adrs import review as rv

    if action not in ("list", "approve", "reject", "note"):
        raise UserError(f"unknown review action {action!r}: use list, approve, reject or note")
    if action == "list":
        with open_for_reading(run_dir) as archive:
            every = rv.checkpoints(archive)
        _list(run_dir, every, json_out)
        return
    with open_archive(run_dir) as archive:
        try:
            target = rv.resolve(archive, checkpoint, for_note=action == "note")
            done = rv.decide(archive, target, action, text or "")
        except (LookupError, ValueError) as exc:
            raise UserError(str(exc)) from None
    what = {"note": "note added to", "approve": "approved", "reject": "rejected"}[action]
    out.print(f"{what} {done.name} ({done.candidate_id})" + (f": {terminal_safe(text)}" if text else ""))


def _list(run_dir: Path, every: list, json_out: bool) -> None:
    if json_out:
        print(json.dumps([{"name": c.name, "iteration": c.iteration, "candidate": c.candidate_id, "reason": c.reason,
                           "decision": c.decision, "notes": list(c.notes)} for c in every]))
        return
    table = Table("checkpoint", "candidate", "why", "decision", "notes", title=f"review: {run_dir}")
    for c in every:
        table.add_row(c.name, c.candidate_id, terminal_safe(c.reason or ""),
                      terminal_safe(c.decision) if c.decision else "[bold yellow]pending[/]",
                      terminal_safe("\n".join(c.notes)))
    out.print(table if every else "no checkpoints yet (config: review.every / review.on_new_best)")
    waiting = [c for c in every if c.pending]
    if waiting:
        out.print(f"{len(waiting)} pending. Decide with: adrs review {run_dir} approve | reject REASON | note TEXT")
