"""Human steering of an agent: review notes and decisions reach the model at its next turn.

Reviewers use the same commands as for the loop (``adrs review RUN note|approve|reject``);
each review tag is delivered once, as a user message, and the transcript records which tags
were delivered so a resumed session does not repeat them.
"""
from __future__ import annotations

from dataclasses import dataclass

from adrs import review
from adrs.archive.store import Archive


@dataclass(frozen=True)
class Steering:
    """A message for the model and the review tags it delivers."""

    text: str
    tags: tuple[str, ...]


def _describe(name: str, message: str, subject: str) -> str:
    key, _, leaf = name.removeprefix(review.REVIEW_PREFIX).partition("/")
    where = f"checkpoint {review.CHECKPOINT_PREFIX}{key} ({subject})"
    if leaf != "decision":
        return f"- note on {where}: {message.strip()}"
    if message.startswith("reject:"):
        return (f"- REJECTED {where}: {message.removeprefix('reject:').strip()} "
                "(that candidate can no longer be the best; do not build on it)")
    note = message.split("\n\n", 1)[1].strip() if "\n\n" in message else ""
    return f"- approved {where}" + (f": {note}" if note else "")


def pending_steering(archive: Archive, delivered: frozenset[str]) -> Steering | None:
    """Review notes and decisions not yet delivered to the model, as one message (None if none)."""
    by_commit = {r.commit: r.id for r in archive.all()}
    fresh = [t for t in archive.checkpoints(review.REVIEW_PREFIX.rstrip("/")) if t.name not in delivered]
    if not fresh:
        return None
    lines = [_describe(t.name, t.message, by_commit.get(t.commit, t.commit[:10])) for t in fresh]
    text = ("Message from the human reviewer (takes priority over your plan; acknowledge it and adapt):\n"
            + "\n".join(lines))
    return Steering(text, tuple(t.name for t in fresh))


def paused_at(archive: Archive, mode: str) -> review.Checkpoint | None:
    """The checkpoint the session must wait on (``review.mode: pause``), if any."""
    if mode != "pause":
        return None
    waiting = review.pending(archive)
    return waiting[0] if waiting else None
