"""Human-review checkpoints, kept in the run's git repository as annotated tags.

* ``checkpoint/<iteration>``: made by the loop (every N iterations, or on a new best) on the
  candidate to review; its message says why.
* ``review/<iteration>/decision``: ``approve`` or ``reject: <reason>``, from ``adrs review``.
* ``review/<iteration>/note-<k>``: a free-text note; the next prompts include the latest notes.

Tags carry who and when, survive ``adrs reindex`` (git is the source of truth) and show in
``git log --decorate``. A checkpoint without a decision is pending; in ``pause`` mode the
loop waits until none is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from adrs.archive.model import ARCHIVE_IDENTITY, CandidateRef
from adrs.archive.store import Archive

Action = Literal["approve", "reject", "note"]
CHECKPOINT_PREFIX = "checkpoint/"
REVIEW_PREFIX = "review/"
PROMPT_NOTES = 5  # the newest notes go into prompts; older ones stay in git


@dataclass(frozen=True)
class Checkpoint:
    """A review checkpoint and what reviewers said about it."""

    name: str  # e.g. "checkpoint/000010"
    iteration: int
    candidate_id: str
    reason: str
    decision: str | None  # "approve", "reject: ..." or None while pending
    notes: tuple[str, ...]

    @property
    def pending(self) -> bool:
        return self.decision is None


def _tags(archive: Archive) -> list[tuple[str, str, str]]:
    """(tag name, tagged commit, full message) for checkpoint and review tags, oldest first."""
    return [(t.name, t.commit, t.message) for t in archive.checkpoints("checkpoint", "review")]


def _key(iteration: int) -> str:
    return f"{iteration:06d}"


def checkpoints(archive: Archive) -> list[Checkpoint]:
    """Every checkpoint of the run, oldest first, with its decision and notes."""
    tags = _tags(archive)
    by_commit = {r.commit: r.id for r in archive.all()}
    decisions: dict[str, str] = {}
    notes: dict[str, list[str]] = {}
    for name, _, message in tags:
        if name.startswith(REVIEW_PREFIX):
            key, _, leaf = name[len(REVIEW_PREFIX):].partition("/")
            if leaf == "decision":
                # Archives made before approval notes were tagged as notes: "approve\n\n<note>".
                decision, _, note = message.partition("\n\n")
                decisions[key] = decision
                if note:
                    notes.setdefault(key, []).append(note)
            else:
                notes.setdefault(key, []).append(message)
    found = []
    for name, commit, message in tags:
        if not name.startswith(CHECKPOINT_PREFIX):
            continue
        key = name[len(CHECKPOINT_PREFIX):]
        found.append(Checkpoint(name, int(key), by_commit.get(commit, commit[:10]), message.splitlines()[0] if message else "",
                                decisions.get(key), tuple(notes.get(key, ()))))
    return sorted(found, key=lambda c: c.iteration)


def pending(archive: Archive) -> list[Checkpoint]:
    """Checkpoints awaiting a decision, oldest first."""
    return [c for c in checkpoints(archive) if c.pending]


def prompt_notes(archive: Archive) -> list[str]:
    """Reviewers' notes for the prompts, newest last."""
    texts = []
    for name, _, message in _tags(archive):
        if not name.startswith(REVIEW_PREFIX):
            continue
        if "/note-" in name:
            texts.append(message)
        elif message.startswith("reject:"):
            texts.append("A reviewer rejected a candidate: " + message.removeprefix("reject:").strip())
        elif "\n\n" in message:  # an approval with a note, as archives made before approval notes were note tags
            texts.append(message.split("\n\n", 1)[1])
    return texts[-PROMPT_NOTES:]


def checkpoint_reason(iteration: int, became_best: bool, every: int, on_new_best: bool) -> str | None:
    """Why the candidate committed at ``iteration`` is a checkpoint, or None."""
    reasons = []
    if on_new_best and became_best:
        reasons.append("new best")
    if every and iteration > 0 and iteration % every == 0:
        reasons.append(f"every {every} iterations")
    return " and ".join(reasons) or None


def make_checkpoint(archive: Archive, iteration: int, candidate: CandidateRef, reason: str) -> Checkpoint:
    """Tag ``candidate`` for review at ``iteration`` (idempotent: an existing one is returned)."""
    name = CHECKPOINT_PREFIX + _key(iteration)
    for c in checkpoints(archive):
        if c.name == name:
            return c
    score = f"{candidate.combined_score:.5f}" if candidate.combined_score is not None else candidate.status
    message = f"{reason}: {candidate.id} score {score}"
    archive.tag_checkpoint(name, candidate, message, tagger=ARCHIVE_IDENTITY)
    return Checkpoint(name, iteration, candidate.id, message, None, ())


def resolve(archive: Archive, name: str | None, for_note: bool = False) -> Checkpoint:
    """A checkpoint by name (``checkpoint/000010``), iteration (``10``), or the oldest pending.

    ``for_note``: with no name and nothing pending, the newest checkpoint (a note needs no decision).
    """
    every = checkpoints(archive)
    if name is None:
        waiting = [c for c in every if c.pending]
        if waiting:
            return waiting[0]
        if for_note and every:
            return every[-1]
        if not every:
            raise LookupError("no checkpoints yet (config: review.every / review.on_new_best)")
        raise LookupError("no checkpoint is pending review")
    key = name.removeprefix(CHECKPOINT_PREFIX)
    for c in every:
        if key.isdigit() and c.iteration == int(key):
            return c
    raise LookupError(f"no checkpoint {name!r} (have: {', '.join(c.name for c in every) or 'none'})")


def decide(archive: Archive, checkpoint: Checkpoint, action: Action, text: str = "") -> Checkpoint:
    """Record a reviewer's decision or note; ``reject`` also rejects the candidate in the archive."""
    text = text.strip()
    key = _key(checkpoint.iteration)
    if action == "note":
        if not text:
            raise ValueError("a note needs text")
        name = f"{REVIEW_PREFIX}{key}/note-{len(checkpoint.notes) + 1}"
        archive.tag_checkpoint(name, checkpoint.candidate_id, text)
    else:
        if checkpoint.decision is not None:
            raise ValueError(f"{checkpoint.name} was already decided: {checkpoint.decision}")
        if action == "reject":
            if not text:
                raise ValueError("a rejection needs a reason")
            archive.mark_rejected(checkpoint.candidate_id, f"review: {text}")
            message = f"reject: {text}"
        else:
            message = "approve"
            if text:  # a note like any other: listed under notes, sent to the next prompts
                archive.tag_checkpoint(f"{REVIEW_PREFIX}{key}/note-{len(checkpoint.notes) + 1}",
                                       checkpoint.candidate_id, text)
        archive.tag_checkpoint(f"{REVIEW_PREFIX}{key}/decision", checkpoint.candidate_id, message)
    return resolve(archive, checkpoint.name)
