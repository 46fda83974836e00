"""One run as the web view reads it: git only, never the run's lock, kept up to date cheaply.

The server may watch a run another process is writing, or a colleague's run it cannot write,
so it opens the archive with :func:`adrs.archive.open_run_readonly` (an in-memory index built
from git) and, when a page asks, compares one ``git for-each-ref`` listing with the last one:
only when a ref moved (a new candidate, a rejection note, a re-score note, a review tag) is the
index synced and the run's version bumped. Pages poll that version.

Candidate records and notes are immutable per git object, so they are cached by sha.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import git

from adrs.archive import Archive, open_run_readonly, sync_readonly
from adrs.archive import gitstore
from adrs.archive.model import CandidateRef

# Several tabs polling every few seconds cost at most one git call per run per interval.
MIN_REFRESH_S = 0.5


@dataclass(frozen=True)
class RunSettings:
    """What the run's config says that the pages need (None where the config is missing)."""

    density_target: float | None = None
    heldout_hash: str | None = None
    heldout_name: str | None = None
    workload: str | None = None


def run_settings(run_dir: Path) -> RunSettings:
    """The density target and the held-out workload's hash from ``config.yaml`` (defaults without one)."""
    from adrs.config import ConfigError, load_config

    path = run_dir / "config.yaml"
    if not path.is_file():
        return RunSettings()
    try:
        cfg = load_config(path)
    except ConfigError:
        return RunSettings()
    spec = cfg.heldout_spec()
    return RunSettings(cfg.density_target, spec.content_hash() if spec else None, spec.name if spec else None,
                       cfg.workload_spec().name)


@dataclass
class RunView:
    """A run opened read-only; every method takes ``lock`` (git and SQLite handles are not thread-safe)."""

    key: str
    path: Path
    archive: Archive
    settings: RunSettings
    lock: threading.RLock = field(default_factory=threading.RLock)
    version: int = 1
    _refs: str | None = None  # the last ref listing; None before the first look (an empty run lists "")
    _checked: float = 0.0
    _candidates: dict[str, tuple[dict[str, Any], str]] = field(default_factory=dict)
    _notes: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def refresh(self, force: bool = False) -> int:
        """Sync with git if any ref moved since the last look; returns the (possibly new) version.

        Looks at most every ``MIN_REFRESH_S`` unless ``force`` (after this server wrote a review).
        """
        with self.lock:
            now = time.monotonic()
            if not force and now - self._checked < MIN_REFRESH_S:
                return self.version
            self._checked = now
            listing = self.archive.repo.git.for_each_ref("--format=%(refname) %(objectname)")
            if listing != self._refs:
                # The first look syncs too: refs may have moved since open_run_readonly read them.
                changed = sync_readonly(self.archive)
                if self._refs is not None or changed:
                    self.version += 1
                self._refs = listing
            return self.version

    def rows(self) -> list[CandidateRef]:
        """Every candidate, by iteration."""
        with self.lock:
            return self.archive.all()

    def get(self, cand: str) -> CandidateRef:
        """A candidate by id, iteration, commit prefix or 'best' (KeyError if none or ambiguous)."""
        with self.lock:
            return self.archive.get(int(cand) if cand.isdigit() and len(cand) < 7 else cand)

    def _read(self, ref: CandidateRef) -> tuple[dict[str, Any], str]:
        with self.lock:
            if ref.commit not in self._candidates:
                _, record, code = gitstore.read_candidate(self.archive.repo, ref.commit)
                self._candidates[ref.commit] = (record, code)
            return self._candidates[ref.commit]

    def record(self, ref: CandidateRef) -> dict[str, Any]:
        """The candidate's score record (as committed)."""
        return self._read(ref)[0]

    def code(self, ref: CandidateRef) -> str:
        """The candidate's file."""
        return self._read(ref)[1]

    def diff(self, a: CandidateRef, b: CandidateRef) -> str:
        """``git diff`` of the candidate file from ``a`` to ``b`` (no external diff or textconv driver runs)."""
        with self.lock:
            return self.archive.repo.git.diff("--no-ext-diff", "--no-textconv", a.commit, b.commit,
                                              "--", gitstore.CODE_FILE)

    def rescores(self) -> dict[str, list[dict[str, Any]]]:
        """``{commit: [re-score entries, oldest first]}`` from the re-score notes."""
        with self.lock:
            try:
                listing = self.archive.repo.git.notes("--ref", gitstore.RESCORE_NOTES, "list")
            except git.GitCommandError:  # no re-score note yet: the notes ref does not exist
                return {}
            found = {}
            for line in listing.splitlines():
                blob, commit = line.split()
                if blob not in self._notes:
                    text = self.archive.repo.odb.stream(bytes.fromhex(blob)).read().decode()
                    self._notes[blob] = [json.loads(s) for s in text.splitlines() if s.strip()]
                found[commit] = self._notes[blob]
            return found

    def close(self) -> None:
        """Release the git and SQLite handles."""
        with self.lock:
            self.archive.close()


def open_view(key: str, run_dir: Path) -> RunView:
    """A :class:`RunView` of ``run_dir`` (FileNotFoundError if it holds no run)."""
    view = RunView(key, run_dir, open_run_readonly(run_dir), run_settings(run_dir))
    view.refresh()
    return view
