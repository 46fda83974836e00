"""Review from the browser: the same functions, so the same git tags, as `adrs review`."""
from __future__ import annotations

from typing import Any

from adrs import review as rv
from adrs.archive import open_run
from adrs.cli.common import writable
from adrs.web.runview import RunView

ACTIONS = ("approve", "reject", "note")


class ReviewRefused(Exception):
    """A review the server will not record; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def review(view: RunView, action: str, text: str, checkpoint: str | None) -> dict[str, Any]:
    """Record ``action`` on ``checkpoint`` (name or iteration; None: as `adrs review` picks) and return it.

    Opens the run for writing (its lock, as the CLI does) only for this one decision.
    """
    if action not in ACTIONS:
        raise ReviewRefused(f"unknown review action {action!r}: use approve, reject or note", 400)
    if not writable(view.path):
        raise ReviewRefused(f"{view.path} is read-only for you: reviews write git tags into the run", 409)
    with open_run(view.path) as archive:
        try:
            target = rv.resolve(archive, checkpoint or None, for_note=action == "note")
            done = rv.decide(archive, target, action, text)
        except (LookupError, ValueError) as exc:
            raise ReviewRefused(str(exc), 400) from None
    view.refresh(force=True)
    return {"name": done.name, "iteration": done.iteration, "candidate": done.candidate_id,
            "decision": done.decision, "notes": list(done.notes)}
