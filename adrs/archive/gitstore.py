"""Git plumbing for the archive: the repository is the source of truth.

Candidates are written with plumbing only (gitdb loose-object writes, then ``git update-ref``), never
through an index or a working tree, so adding a child of an old candidate moves no other ref.
Each write is atomic on its own: gitdb writes an object to a temp file and renames it, and
update-ref renames a ``.lock`` file onto the ref. An interrupted write leaves at most an
unreferenced object or a stale ``.lock`` file, which :func:`clear_stale_locks` removes.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Mapping

import git
from gitdb import LooseObjectDB
from gitdb.base import IStream

from adrs.archive.model import ARCHIVE_IDENTITY, Identity, Meta

CANDIDATE_REFS = "refs/candidates"
BEST_REF = "refs/heads/best"
REJECT_NOTES = "refs/notes/rejected"  # a note here means "rejected"; its text holds the reason
RESCORE_NOTES = "refs/notes/rescores"  # one JSON line per re-score (adrs rescore, cascade)
CODE_FILE = "candidate.py"
RECORD_FILE = "score.json"


def init_repo(path: Path) -> git.Repo:
    """Create the bare candidate repository at ``path`` atomically, or open the existing one.

    The repository is built in a temp directory and renamed into place, so a kill during
    ``git init`` or the config writes (GitPython writes config in place) never leaves a
    half-made ``repo/``. Call with the run lock held.
    """
    if path.is_dir():
        return git.Repo(path)
    for old in path.parent.glob(path.name + ".tmp-*"):  # leftovers of killed creations
        shutil.rmtree(old, ignore_errors=True)
    tmp = path.parent / f"{path.name}.tmp-{os.getpid()}"
    repo = git.Repo.init(tmp, bare=True)
    with repo.config_writer() as cw:
        cw.set_value("gc", "auto", "0")  # no background gc racing a SIGKILL; objects are small
        cw.set_value("core", "logAllRefUpdates", "true")  # reflog of `best` = history of the leader
        cw.set_value("notes", "displayRef", REJECT_NOTES)  # `git log` shows rejections inline
    # HEAD follows `best`, so a bare `git log` in the repo is the lineage of the best candidate.
    repo.git.symbolic_ref("HEAD", BEST_REF)
    repo.close()
    os.rename(tmp, path)
    return git.Repo(path)


def _store(odb: LooseObjectDB, kind: bytes, data: bytes) -> str:
    # In-process equivalent of `git hash-object -w`: temp file + rename, so a kill leaves
    # either the whole object or a stray objects/obj* temp file (see clear_stale_locks).
    return odb.store(IStream(kind, len(data), BytesIO(data))).hexsha.decode()


def _actor_line(who: Identity, when: float) -> str:
    return f"{who.name} <{who.email}> {int(when)} +0000"


def write_commit(
    repo: git.Repo, code: str, meta: Meta, record: Mapping[str, Any], message: str,
    parent_commit: str | None, author: Identity,
) -> str:
    """Write blobs, tree and commit objects for a candidate; return the commit sha (no ref yet)."""
    odb = LooseObjectDB(str(Path(repo.git_dir) / "objects"))
    score = {"archive": meta.to_dict(), **record}  # bookkeeping first: it reads first in `git show`
    code_blob = _store(odb, b"blob", code.encode())
    score_blob = _store(odb, b"blob", (json.dumps(score, indent=2, default=str) + "\n").encode())
    # Tree entries must be sorted by name; "candidate.py" < "score.json".
    tree = b"".join(
        b"100644 " + name.encode() + b"\0" + bytes.fromhex(sha)
        for name, sha in sorted([(CODE_FILE, code_blob), (RECORD_FILE, score_blob)])
    )
    tree_sha = _store(odb, b"tree", tree)
    head = [f"tree {tree_sha}"] + ([f"parent {parent_commit}"] if parent_commit else [])
    head += [f"author {_actor_line(author, meta.created)}", f"committer {_actor_line(ARCHIVE_IDENTITY, meta.created)}"]
    return _store(odb, b"commit", ("\n".join(head) + "\n\n" + message).encode())


def create_ref(repo: git.Repo, cid: str, commit: str) -> None:
    """Point ``refs/candidates/<cid>`` at ``commit``; fails if the ref already exists."""
    # The empty old-value makes update-ref refuse to overwrite: a candidate is written once.
    repo.git.update_ref(f"{CANDIDATE_REFS}/{cid}", commit, "")


def candidate_refs(repo: git.Repo) -> dict[str, str]:
    """``{candidate id: commit sha}`` for every candidate ref."""
    return refs_snapshot(repo)[0]


@dataclass(frozen=True)
class RefState:
    """What the index must agree with: the candidate ids, and where ``best`` and the rejection notes point."""

    ids: frozenset[str]
    best: str | None
    rejected: str | None


def ref_state(repo: git.Repo) -> RefState | None:
    """The refs that matter to the index, read from git's ref files (loose refs and packed-refs)
    with no git process (~7 ms each); None for git's other ref backend (reftable, opt-in)."""
    root = Path(repo.common_dir)
    if (root / "reftable").exists():
        return None
    packed = _packed_refs(root)
    prefix = CANDIDATE_REFS + "/"
    try:
        # A ref being written is a ``.lock`` file beside the others until git renames it into place.
        ids = {e.name for e in os.scandir(root / CANDIDATE_REFS) if e.is_file() and not e.name.endswith(".lock")}
    except FileNotFoundError:
        ids = set()
    ids.update(name.removeprefix(prefix) for name in packed if name.startswith(prefix))
    return RefState(frozenset(ids), _loose_target(root, BEST_REF) or packed.get(BEST_REF),
                    _loose_target(root, REJECT_NOTES) or packed.get(REJECT_NOTES))


def candidate_ids(repo: git.Repo) -> list[str]:
    """Every candidate ref's id (the loop asks several times per iteration: no git process)."""
    state = ref_state(repo)
    return sorted(state.ids) if state is not None else list(candidate_refs(repo))


def _packed_refs(root: Path) -> dict[str, str]:
    """``{refname: sha}`` from packed-refs ("<sha> <refname>" lines, "#" headers, "^" peeled tags)."""
    try:
        text = (root / "packed-refs").read_text()
    except FileNotFoundError:
        return {}
    refs = {}
    for line in text.splitlines():
        if line and line[0] not in "#^":
            sha, _, name = line.partition(" ")
            refs[name] = sha
    return refs


def _loose_target(root: Path, ref: str) -> str | None:
    """A loose ref's content (a loose ref overrides a packed one), or None if there is no file."""
    try:
        return (root / ref).read_text().strip() or None
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def refs_snapshot(repo: git.Repo) -> tuple[dict[str, str], str | None]:
    """Candidate refs and the ``best`` branch, read with a single git call."""
    out = repo.git.for_each_ref("--format=%(refname) %(objectname)", CANDIDATE_REFS, BEST_REF)
    cands, best = {}, None
    for line in out.splitlines():
        ref, sha = line.split()
        if ref == BEST_REF:
            best = sha
        else:
            cands[ref.removeprefix(CANDIDATE_REFS + "/")] = sha
    return cands, best


def read_candidate(repo: git.Repo, commit: str) -> tuple[Meta, dict[str, Any], str]:
    """``(meta, record, code)`` stored in a candidate commit."""
    tree = repo.commit(commit).tree
    data = json.loads(tree[RECORD_FILE].data_stream.read())
    meta = Meta.from_dict(data.pop("archive"))
    return meta, data, tree[CODE_FILE].data_stream.read().decode()


def set_best(repo: git.Repo, commit: str | None, current: str | None) -> None:
    """Move (or delete, when nothing is eligible) the ``best`` branch from ``current``."""
    if commit == current:
        return
    if commit is None:
        repo.git.update_ref("-d", BEST_REF)
    else:
        repo.git.update_ref("-m", f"best candidate {commit[:10]}", BEST_REF, commit)


def ref_target(repo: git.Repo, ref: str) -> str | None:
    try:
        return repo.git.rev_parse("--verify", "--quiet", ref + "^{commit}") or None
    except git.GitCommandError:
        return None


def rejections(repo: git.Repo) -> dict[str, str]:
    """``{commit sha: note blob sha}`` of rejected candidates."""
    try:
        out = repo.git.notes("--ref", REJECT_NOTES, "list")
    except git.GitCommandError:
        return {}
    return {c: n for n, c in (line.split() for line in out.splitlines() if line.strip())}


def reject_reason(repo: git.Repo, note_blob: str) -> str:
    """The reason stored in a rejection note (its first line is ``rejected: <reason>``)."""
    text = repo.git.cat_file("blob", note_blob)
    first = text.splitlines()[0] if text else ""
    return first.removeprefix("rejected:").strip()


def add_rejection(repo: git.Repo, commit: str, reason: str, reviewer: Identity, when: float) -> None:
    text = f"rejected: {' '.join(reason.split())}\nreviewer: {reviewer}\ndate: {_iso(when)}\n"
    env = {**reviewer.env("AUTHOR"), **reviewer.env("COMMITTER")}
    repo.git.notes("--ref", REJECT_NOTES, "add", "-f", "-m", text, commit, env=env)


def append_note(repo: git.Repo, notes_ref: str, commit: str, line: str, who: Identity) -> None:
    """Append one line to ``commit``'s note in ``notes_ref`` (created if absent; git puts a blank line between)."""
    env = {**who.env("AUTHOR"), **who.env("COMMITTER")}
    repo.git.notes("--ref", notes_ref, "append", "-m", line, commit, env=env)


def read_note(repo: git.Repo, notes_ref: str, commit: str) -> str:
    """The note text on ``commit`` in ``notes_ref``; '' when there is none."""
    try:
        return repo.git.notes("--ref", notes_ref, "show", commit)
    except git.GitCommandError:
        return ""


def add_tag(repo: git.Repo, name: str, commit: str, message: str, tagger: Identity) -> None:
    """An annotated tag (so it carries who, when and why); fails if the tag exists."""
    # whitespace cleanup keeps lines starting with "#" (a note may quote code)
    repo.git.tag("-a", "--cleanup=whitespace", name, "-m", message, commit, env=tagger.env("COMMITTER"))


def _iso(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def clear_stale_locks(repo_dir: Path) -> list[Path]:
    """Remove ``*.lock`` files left by a killed git process, and gitdb's half-written temp objects.

    Only safe while holding the run lock: every writer to this repository goes through it,
    so no live process can own one of these files.
    """
    # Git's lock files live at the top (HEAD.lock, packed-refs.lock, config.lock) and beside
    # refs; objects/ is not walked recursively since it grows with every candidate.
    stale = [p for p in repo_dir.glob("*.lock") if p.is_file()]
    stale += [p for p in (repo_dir / "refs").rglob("*.lock") if p.is_file()]
    stale += [p for p in (repo_dir / "objects").glob("obj*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


