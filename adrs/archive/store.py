"""A run's store: ``open_run`` and the :class:`Archive` it returns.

Layout of a run directory::

    config.yaml     resolved config (written by the caller; see Archive.config_path)
    repo/           bare git repository, one commit per candidate  <- source of truth
    index.sqlite    SQLite index (WAL) for the leaderboard          <- derived, rebuildable
    logs/           free for the loop's logs
    archive.lock    fcntl lock serialising writers across processes

Write order for every change is git first, index second, both under the run lock; on open
(and before each write) :meth:`Archive.recover` makes the index agree with git. So after a
SIGKILL at any point a candidate is either fully recorded or absent.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import git

from adrs.archive import gitstore, index
from adrs.archive.model import (
    ARCHIVE_IDENTITY, AUTHOR_KINDS, MODEL_IDENTITY, SEED_IDENTITY, AuthorKind, CandidateRef, Identity, Meta,
    candidate_id, commit_message, human_identity, iteration_of, one_line, row_from,
)

LOCK_FILE = "archive.lock"
INDEX_FILE = "index.sqlite"


class ArchiveError(RuntimeError):
    """A request the archive cannot honour (duplicate iteration, unknown candidate, ...)."""


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive inter-process lock on the run; released by the kernel if the holder dies.

    Not re-entrant (flock on a second descriptor would block), so public methods take it
    once and call ``_locked`` helpers.
    """
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor drops the lock


@dataclass(frozen=True)
class RecoverReport:
    """What :meth:`Archive.recover` had to fix."""

    inserted: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    restatused: tuple[str, ...] = ()
    stale_locks: int = 0
    best: str | None = None
    # Git state seen while recovering, so a caller holding the lock need not read it again.
    ids: frozenset[str] = field(default_factory=frozenset, repr=False, compare=False)
    best_commit: str | None = field(default=None, repr=False, compare=False)

    @property
    def clean(self) -> bool:
        return not (self.inserted or self.deleted or self.restatused or self.stale_locks)


@dataclass(frozen=True)
class Checkpoint:
    name: str
    commit: str
    message: str


@dataclass(frozen=True)
class Archive:
    """Handle on one run directory. Cheap to open; open one per process."""

    run_dir: Path
    repo: git.Repo
    conn: sqlite3.Connection
    recovery: RecoverReport = field(default_factory=RecoverReport, compare=False)
    """What open_run's recover() repaired (worth a log line after a crash)."""
    # {"state": RefState} while the index is known to match git as it stands (see _recover_locked).
    _synced: dict[str, gitstore.RefState] = field(default_factory=dict, compare=False, repr=False)

    # -- paths -------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.run_dir / "config.yaml"

    @property
    def repo_dir(self) -> Path:
        return self.run_dir / "repo"

    @property
    def index_path(self) -> Path:
        return self.run_dir / INDEX_FILE

    @property
    def logs_dir(self) -> Path:
        return self.run_dir / "logs"

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        self.conn.close()
        self.repo.close()

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes ------------------------------------------------------------------------------
    def add_candidate(
        self, code: str, record: Mapping[str, Any], parent: str | int | CandidateRef | None = None,
        iteration: int | None = None, island: int = 0, author: AuthorKind = "model",
        summary: str = "", identity: Identity | None = None, created: float | None = None,
    ) -> CandidateRef:
        """Commit a candidate (valid or failed) and index it; returns its row.

        ``record`` is the score record (metrics, per-layer, validity/category, wall time,
        workload hash, ``llm: {model, usage}``, prompt, raw response). ``iteration=None``
        takes the next free number under the lock, which is what concurrent writers want.
        ``identity`` overrides the git author (default: model/seed identity, or the human
        from git config for ``author='human'``).
        """
        if author not in AUTHOR_KINDS:
            raise ValueError(f"author must be one of {AUTHOR_KINDS}, got {author!r}")
        if "archive" in record:
            raise ValueError("record key 'archive' is reserved for the archive's bookkeeping")
        with run_lock(self.run_dir):
            rep = self._recover_locked(full=False)  # another writer may have died between git and index
            ids, refs_best = rep.ids, rep.best_commit
            it = _next_iteration(ids) if iteration is None else int(iteration)
            cid = candidate_id(it)
            if it < 0 or cid in ids:
                raise ArchiveError(f"iteration {it} is already recorded (or negative)")
            parent_ref = None if parent is None else self.get(parent)
            meta = Meta(
                id=cid, iteration=it, island=int(island), author=author,
                parent_id=parent_ref.id if parent_ref else None,
                summary=one_line(summary), created=time.time() if created is None else float(created),
            )
            who = identity or self._default_identity(author)
            msg = commit_message(meta, record, parent_ref.commit if parent_ref else None)
            self._synced.clear()  # until this write is done, git and the index may differ
            # 1) git: objects, then the ref that makes them reachable. This is the commit point.
            commit = gitstore.write_commit(self.repo, code, meta, record, msg,
                                           parent_ref.commit if parent_ref else None, who)
            gitstore.create_ref(self.repo, cid, commit)
            # 2) index row, 3) best branch; both re-derivable by recover() if we die here.
            row = row_from(meta, record, commit, None)
            index.insert(self.conn, row)
            self._update_best_locked(refs_best)
            self._note_synced()
            return row

    def mark_rejected(self, candidate: str | int | CandidateRef, reason: str,
                      reviewer: Identity | None = None) -> CandidateRef:
        """Reject a candidate after review: it stays archived but is no longer eligible for best.

        The rejection is a git note (``refs/notes/rejected``), so a rebuild from git keeps it.
        """
        with run_lock(self.run_dir):
            current_best = self._recover_locked(full=False).best_commit
            ref = self.get(candidate)
            who = reviewer or self._human()
            self._synced.clear()
            gitstore.add_rejection(self.repo, ref.commit, reason, who, time.time())
            reason_stored = gitstore.reject_reason(self.repo, gitstore.rejections(self.repo)[ref.commit])
            index.set_rejected(self.conn, ref.id, reason_stored, "rejected")
            self._update_best_locked(current_best)
            self._note_synced()
            return self.get(ref.id)

    def add_rescore(self, candidate: str | int | CandidateRef, data: Mapping[str, Any],
                    who: Identity | None = None) -> None:
        """Keep a re-score (held-out, another workload) beside the candidate, as a git note line."""
        with run_lock(self.run_dir):
            ref = self.get(candidate)
            gitstore.append_note(self.repo, gitstore.RESCORE_NOTES, ref.commit,
                                 json.dumps(dict(data), sort_keys=True), who or ARCHIVE_IDENTITY)

    def rescores(self, candidate: str | int | CandidateRef) -> list[dict[str, Any]]:
        """Every re-score kept for a candidate, oldest first."""
        text = gitstore.read_note(self.repo, gitstore.RESCORE_NOTES, self.get(candidate).commit)
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def tag_checkpoint(self, name: str, candidate: str | int | CandidateRef, message: str,
                       tagger: Identity | None = None) -> Checkpoint:
        """Annotated tag ``name`` on a candidate, e.g. a review checkpoint."""
        with run_lock(self.run_dir):
            ref = self.get(candidate)
            gitstore.add_tag(self.repo, name, ref.commit, message, tagger or self._human())
        return Checkpoint(name, ref.commit, message)

    def checkpoints(self, *prefixes: str) -> list[Checkpoint]:
        """Annotated tags, all or those under ``refs/tags/<prefix>``, oldest first, with full messages."""
        patterns = [f"refs/tags/{p}" for p in prefixes] or ["refs/tags"]
        out = self.repo.git.for_each_ref(
            "--sort=creatordate", "--format=%(refname:lstrip=2)%00%(*objectname)%00%(contents)%01", *patterns)
        found = []
        for chunk in out.split("\x01"):  # messages may span lines: \x01 ends each record
            chunk = chunk.strip("\n")
            if chunk:
                name, commit, message = chunk.split("\0", 2)
                found.append(Checkpoint(name, commit, message.strip()))
        return found

    # -- recovery ----------------------------------------------------------------------------
    def recover(self) -> RecoverReport:
        """Make the index and the best branch agree with git (run on open; idempotent)."""
        with run_lock(self.run_dir):
            return self._recover_locked()

    def reindex(self) -> int:
        """Drop every index row and rebuild from git; returns the number of candidates."""
        with run_lock(self.run_dir):
            self._synced.clear()
            self.conn.execute("DELETE FROM candidates")
            self._recover_locked()
            return len(self.all())

    def _note_synced(self) -> None:
        """After a write of ours that completed: the index matches git as it stands now."""
        state = gitstore.ref_state(self.repo)
        if state is not None:
            self._synced["state"] = state

    def _recover_locked(self, full: bool = True) -> RecoverReport:
        """``full=False`` (before a write of ours): skip the pass when git has not changed since
        the index last matched it; ``recover()`` always compares everything."""
        stale = gitstore.clear_stale_locks(self.repo_dir)
        state = None if full or stale else gitstore.ref_state(self.repo)
        if state is not None and state == self._synced.get("state"):
            # No writer changed git since the index last matched it (one that died halfway would
            # have left a ref, a note or ``best`` moved): skip the full pass, two git processes
            # and every index row read, which made each commit O(archive).
            best = index.best(self.conn)
            return RecoverReport(best=best.id if best else None, ids=state.ids, best_commit=state.best)
        self._synced.clear()
        refs, best_commit = gitstore.refs_snapshot(self.repo)
        notes = gitstore.rejections(self.repo)
        rows = {r.id: r for r in index.all_rows(self.conn)}
        deleted = [cid for cid, r in rows.items() if refs.get(cid) != r.commit]
        inserted = [cid for cid, sha in refs.items() if cid not in rows or cid in deleted]
        restatused = []
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            for cid in deleted:  # rows without a (matching) commit
                index.delete(self.conn, cid)
            for cid in inserted:  # commits without a row
                meta, record, _ = gitstore.read_candidate(self.repo, refs[cid])
                note = notes.get(refs[cid])
                reason = gitstore.reject_reason(self.repo, note) if note else None
                index.insert(self.conn, row_from(meta, record, refs[cid], reason))
            for cid, r in rows.items():  # rejections written to git but not to the index
                if cid in deleted or (r.status == "rejected") == (r.commit in notes):
                    continue
                meta, record, _ = gitstore.read_candidate(self.repo, r.commit)
                note = notes.get(r.commit)
                fixed = row_from(meta, record, r.commit, gitstore.reject_reason(self.repo, note) if note else None)
                index.set_rejected(self.conn, cid, fixed.reject_reason, fixed.status)
                restatused.append(cid)
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        best = self._update_best_locked(best_commit)
        self._note_synced()
        return RecoverReport(tuple(inserted), tuple(deleted), tuple(restatused), len(stale),
                             best.id if best else None, frozenset(refs), best.commit if best else None)

    def _update_best_locked(self, current: str | None) -> CandidateRef | None:
        """Point ``best`` at the index's best row; ``current`` is where the branch is now."""
        best = index.best(self.conn)
        gitstore.set_best(self.repo, best.commit if best else None, current)
        return best

    # -- reads -------------------------------------------------------------------------------
    def next_iteration(self) -> int:
        """The iteration a resumed loop continues at: one past the highest committed one."""
        # From git refs, not the index: a candidate whose row is not written yet still counts.
        return _next_iteration(gitstore.candidate_ids(self.repo))

    def get(self, cand: str | int | CandidateRef) -> CandidateRef:
        """Look up by id (``c000012``), iteration (12 or "12"), commit prefix, or ``'best'``."""
        if isinstance(cand, CandidateRef):
            cand = cand.id
        if isinstance(cand, int) or (isinstance(cand, str) and cand.isdigit() and len(cand) < 7):
            hits = index.find(self.conn, "iteration = ?", (int(cand),))
        elif cand == "best":
            b = index.best(self.conn)
            hits = [b] if b else []
        elif re.fullmatch(r"c\d+", cand):
            hits = index.find(self.conn, "id = ?", (cand,))
        elif re.fullmatch(r"[0-9a-f]{4,40}", cand):
            hits = index.find(self.conn, '"commit" LIKE ?', (cand + "%",))
        else:
            hits = []
        if len(hits) != 1:
            raise KeyError(f"{'ambiguous' if hits else 'no'} candidate {cand!r}")
        return hits[0]

    def best(self) -> CandidateRef | None:
        return index.best(self.conn)

    def leaderboard(self, top_k: int = 10, island: int | None = None,
                    include_failed: bool = False) -> list[CandidateRef]:
        """Top ``top_k`` valid candidates by combined_score (higher is better)."""
        return index.leaderboard(self.conn, top_k, island, include_failed)

    def all(self) -> list[CandidateRef]:
        """Every indexed candidate, by iteration."""
        return index.all_rows(self.conn)

    def code(self, cand: str | int | CandidateRef) -> str:
        return gitstore.read_candidate(self.repo, self.get(cand).commit)[2]

    def record(self, cand: str | int | CandidateRef) -> dict[str, Any]:
        return gitstore.read_candidate(self.repo, self.get(cand).commit)[1]

    def lineage(self, cand: str | int | CandidateRef) -> list[CandidateRef]:
        """The candidate and its ancestors, newest first (same as ``git log <commit>``)."""
        out, ref = [], self.get(cand)
        while ref is not None:
            out.append(ref)
            ref = self.get(ref.parent_id) if ref.parent_id else None
        return out

    def diff(self, cand: str | int | CandidateRef) -> str:
        """The mutation: ``git diff parent commit`` of candidate.py ('' for a root)."""
        ref = self.get(cand)
        if not ref.parent_id:
            return ""
        return self.repo.git.diff(self.get(ref.parent_id).commit, ref.commit, "--", gitstore.CODE_FILE)

    # -- identities --------------------------------------------------------------------------
    def _human(self) -> Identity:
        reader = self.repo.config_reader()  # repo, then global and system config
        name = reader.get_value("user", "name", default="") or None
        email = reader.get_value("user", "email", default="") or None
        return human_identity(name, email)

    def _default_identity(self, author: AuthorKind) -> Identity:
        return {"model": MODEL_IDENTITY, "seed": SEED_IDENTITY}.get(author) or self._human()


def _next_iteration(ids: Iterable[str]) -> int:
    its = [iteration_of(cid) for cid in ids]
    return max(its) + 1 if its else 0


def _connect_or_reset(path: Path) -> sqlite3.Connection:
    """Open the index; a corrupt file is discarded (git has everything) and started afresh."""
    try:
        return index.connect(path)
    except sqlite3.DatabaseError:
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
        return index.connect(path)


def open_run(run_dir: str | os.PathLike[str], create: bool = False) -> Archive:
    """Open a run directory (``create=True`` makes it), then :meth:`Archive.recover` it."""
    run_dir = Path(run_dir)
    if not (run_dir / "repo").is_dir():
        if not create:
            raise FileNotFoundError(f"{run_dir} is not a run directory (no repo/); pass create=True")
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # prompts, code, scores: the user's own
    with run_lock(run_dir):
        # init_repo is atomic and idempotent, so a create killed half-way is simply redone.
        repo = gitstore.init_repo(run_dir / "repo") if create else git.Repo(run_dir / "repo")
        (run_dir / "logs").mkdir(exist_ok=True)
        archive = Archive(run_dir, repo, _connect_or_reset(run_dir / INDEX_FILE))
        return replace(archive, recovery=archive._recover_locked())


def open_run_readonly(run_dir: str | os.PathLike[str]) -> Archive:
    """Open a run for reading only (a colleague's run, a read-only mount): no lock, no writes.

    The index is rebuilt in memory from git, so a stale or missing ``index.sqlite`` does not
    matter; :func:`sync_readonly` brings it up to date later (a run another process is writing).
    Git refuses by default to read a repository another user owns ("dubious ownership"); this
    handle's git commands trust this one repository, and the commands used to read
    (for-each-ref, notes, cat-file, diff --no-ext-diff) run nothing it configures. The in-memory
    index may be used from several threads, one at a time (the caller serialises them).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "repo").is_dir():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no repo/)")
    repo = git.Repo(run_dir / "repo")
    repo.git.update_environment(GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0="safe.directory",
                                GIT_CONFIG_VALUE_0=str((run_dir / "repo").resolve()))
    conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    conn.executescript(index.SCHEMA)
    archive = Archive(run_dir, repo, conn)
    sync_readonly(archive)
    return archive


def sync_readonly(archive: Archive) -> bool:
    """Make a read-only handle's in-memory index agree with git; True if any row changed.

    Reads git only, so it is safe while another process writes the run: a candidate's ref is
    written after its objects, so a candidate is seen whole or not at all. Rows are re-read only
    for new candidates and for those whose rejection state changed.
    """
    refs, _ = gitstore.refs_snapshot(archive.repo)
    notes = gitstore.rejections(archive.repo)
    rows = {r.id: r for r in index.all_rows(archive.conn)}
    stale = [cid for cid, r in rows.items() if refs.get(cid) != r.commit
             or (r.status == "rejected") != (r.commit in notes)]
    fresh = [cid for cid in refs if cid not in rows or cid in stale]
    for cid in stale:
        index.delete(archive.conn, cid)
    for cid in fresh:
        meta, record, _ = gitstore.read_candidate(archive.repo, refs[cid])
        note = notes.get(refs[cid])
        reason = gitstore.reject_reason(archive.repo, note) if note else None
        index.insert(archive.conn, row_from(meta, record, refs[cid], reason))
    return bool(stale or fresh)


def reindex(run_dir: str | os.PathLike[str]) -> int:
    """Rebuild ``index.sqlite`` from git alone (``adrs reindex RUN``); returns the candidate count."""
    run_dir = Path(run_dir)
    with run_lock(run_dir):
        for suffix in ("", "-wal", "-shm"):
            (run_dir / (INDEX_FILE + suffix)).unlink(missing_ok=True)
    with open_run(run_dir) as archive:  # recover() on an empty index inserts every candidate
        return len(archive.all())
