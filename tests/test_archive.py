"""The run archive on real git repositories and real SQLite files (no mocks)."""
from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import git
import pytest

from adrs.archive import ArchiveError, Identity, open_run, reindex, run_lock
from adrs.archive import gitstore, index
from adrs.archive.model import Meta, candidate_id, commit_message

SEED_CODE = "def masker(inp):\n    return topk(inp, 0.1)\n"


def rec(score: float | None = None, category: str = "timeout", **extra) -> dict:
    """A score record shaped like the evaluator's, plus the LLM fields the loop adds."""
    if score is None:
        return {"valid": False, "category": category, "reason": f"{category} after 30 s", "wall_s": 30.0, **extra}
    return {
        "valid": True, "combined_score": score, "error": -score, "density": 0.098, "wall_s": 2.5,
        "per_layer": [{"layer": 0, "error": -score, "density": 0.098}], "workload": "tiny-1a2b3c",
        "llm": {"model": "gpt-test", "usage": {"prompt_tokens": 1200, "completion_tokens": 300}},
        "prompt": "improve the masker", "response": "```python\n...\n```", **extra,
    }


def gitc(run: Path, *args: str) -> str:
    return git.Repo(run / "repo").git.execute(["git", *args])


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return tmp_path / "run"


def test_layout_and_reopen(run: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_run(run)
    with open_run(run, create=True) as a:
        assert a.repo.bare and a.logs_dir.is_dir() and a.config_path == run / "config.yaml"
        assert a.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert a.next_iteration() == 0 and a.best() is None and a.leaderboard() == []
    with open_run(run) as a:  # reopen an existing run without create
        assert a.all() == []


def test_add_lineage_and_diff(run: Path) -> None:
    with open_run(run, create=True) as a:
        seed = a.add_candidate(SEED_CODE, rec(-0.2), author="seed", summary="seed: top-k")
        child = a.add_candidate(SEED_CODE.replace("0.1", "0.09"), rec(-0.1), parent=seed.id, iteration=1,
                                island=1, summary="lower k\nsecond line is dropped")
        grand = a.add_candidate(SEED_CODE.replace("0.1", "0.08"), rec(-0.08), parent=child.id, summary="lower k again")
        assert (seed.iteration, child.iteration, grand.iteration) == (0, 1, 2)
        sibling_refs_before = gitstore.candidate_refs(a.repo)
        sibling = a.add_candidate("x = 1\n", rec(-0.5), parent=seed.id, summary="branch off the seed")
        # Committing on top of an old candidate moves no other candidate's ref.
        refs = gitstore.candidate_refs(a.repo)
        assert {k: refs[k] for k in sibling_refs_before} == sibling_refs_before
        assert a.repo.commit(sibling.commit).parents[0].hexsha == seed.commit

        assert [r.id for r in a.lineage(grand)] == [grand.id, child.id, seed.id]
        assert a.code(grand) == SEED_CODE.replace("0.1", "0.08")
        assert a.record(child)["prompt"] == "improve the masker"
        assert "-    return topk(inp, 0.1)" in a.diff(child) and "+    return topk(inp, 0.09)" in a.diff(child)
        assert child.summary == "lower k"

    # git itself shows the lineage and the mutation.
    subjects = gitc(run, "log", "--format=%s", grand.commit).splitlines()
    assert subjects == [
        "iter 2 [island 0] score -0.0800 (err 0.0800, density 0.098): lower k again",
        "iter 1 [island 1] score -0.1000 (err 0.1000, density 0.098): lower k",
        "iter 0 [island 0] score -0.2000 (err 0.2000, density 0.098): seed: top-k",
    ]
    assert "+    return topk(inp, 0.09)" in gitc(run, "diff", seed.commit, child.commit, "--", "candidate.py")
    assert gitc(run, "ls-tree", "--name-only", grand.commit).split() == ["candidate.py", "score.json"]
    score = json.loads(gitc(run, "show", f"{child.commit}:score.json"))
    assert score["archive"]["parent_id"] == seed.id and score["llm"]["model"] == "gpt-test"
    body = gitc(run, "log", "-1", "--format=%b", child.commit)
    assert "Model: gpt-test" in body and "Parent: c000000" in body and "Tokens: 1200 prompt + 300 completion" in body


def test_failed_candidates_are_recorded(run: Path) -> None:
    with open_run(run, create=True) as a:
        ok = a.add_candidate(SEED_CODE, rec(-0.3), author="seed", summary="seed")
        bad = a.add_candidate("while True: pass\n", rec(None, "timeout"), parent=ok.id, summary="spin forever")
        assert bad.status == "failed" and bad.category == "timeout" and bad.combined_score is None
        assert gitstore.candidate_refs(a.repo)[bad.id] == bad.commit  # referenced, so never gc'd
        assert [r.id for r in a.leaderboard()] == [ok.id]
        assert [r.id for r in a.leaderboard(include_failed=True)] == [ok.id, bad.id]
        assert a.best().id == ok.id
    assert gitc(run, "log", "-1", "--format=%s", bad.commit) == "iter 1 [island 0] FAILED (timeout): spin forever"
    assert "Failure: timeout after 30 s" in gitc(run, "log", "-1", "--format=%b", bad.commit)


def test_best_branch_tracks_best_valid_and_rejections(run: Path) -> None:
    with open_run(run, create=True) as a:
        def best_branch() -> str | None:
            return gitstore.ref_target(a.repo, gitstore.BEST_REF)

        s = a.add_candidate(SEED_CODE, rec(-0.3), author="seed", summary="seed")
        assert best_branch() == s.commit
        worse = a.add_candidate("a\n", rec(-0.4), parent=s.id, summary="worse")
        assert best_branch() == s.commit
        a.add_candidate("b\n", rec(None), parent=s.id, summary="failed")
        better = a.add_candidate("c\n", rec(-0.1), parent=worse.id, summary="better")
        tie = a.add_candidate("d\n", rec(-0.1), parent=s.id, summary="tie goes to the earlier")
        assert best_branch() == better.commit and a.get("best").id == better.id

        rejected = a.mark_rejected(better, "reads future keys", reviewer=Identity("Ada", "ada@example.org"))
        assert rejected.status == "rejected" and rejected.reject_reason == "reads future keys"
        assert best_branch() == tie.commit
        assert better.id not in [r.id for r in a.leaderboard()]
        for r in (tie, s, worse):
            a.mark_rejected(r, "nope")
        assert best_branch() is None and a.best() is None
        note = gitc(run, "notes", "--ref", gitstore.REJECT_NOTES, "show", better.commit)
        assert note.startswith("rejected: reads future keys") and "Ada <ada@example.org>" in note
        # HEAD follows best and `git log` shows the rejection note inline.
        a.add_candidate("e\n", rec(-0.2), parent=s.id, summary="fresh")
    assert "Notes:" not in gitc(run, "log", "-1")
    assert "rejected: reads future keys" in gitc(run, "log", "-1", better.commit)
    # The rejection lives in git: a rebuild keeps it.
    reindex(run)
    with open_run(run) as a:
        assert a.get(better.id).status == "rejected" and a.best().summary == "fresh"


def test_checkpoint_tags(run: Path) -> None:
    with open_run(run, create=True) as a:
        s = a.add_candidate(SEED_CODE, rec(-0.3), author="seed", summary="seed")
        cp = a.tag_checkpoint("review-1", "best", "reviewed by Ada: ok", tagger=Identity("Ada", "ada@example.org"))
        assert cp.commit == s.commit
        with pytest.raises(git.GitCommandError):
            a.tag_checkpoint("review-1", s.id, "again")  # tags are immutable
        assert [(c.name, c.commit, c.message) for c in a.checkpoints()] == [("review-1", s.commit, "reviewed by Ada: ok")]
    assert gitc(run, "cat-file", "-t", "review-1") == "tag"  # annotated
    assert "Tagger: Ada <ada@example.org>" in gitc(run, "show", "--no-patch", "review-1")


def test_human_and_model_authors_are_distinct(run: Path) -> None:
    with open_run(run, create=True) as a:
        with a.repo.config_writer() as cw:  # the human comes from git config
            cw.set_value("user", "name", "Grace Hopper")
            cw.set_value("user", "email", "grace@example.org")
        s = a.add_candidate(SEED_CODE, rec(-0.3), author="seed", summary="seed")
        m = a.add_candidate("m\n", rec(-0.2), parent=s.id, summary="model edit")
        h = a.add_candidate("h\n", rec(-0.1), parent=m.id, author="human", summary="hand patch")
        o = a.add_candidate("o\n", rec(-0.1), parent=m.id, author="human", summary="pair",
                            identity=Identity("Alan", "alan@example.org"))
        assert (h.author, m.author, s.author) == ("human", "model", "seed")
        with pytest.raises(ValueError):
            a.add_candidate("x\n", rec(-0.1), author="robot")  # type: ignore[arg-type]
    fmt = "--format=%an <%ae>|%cn"
    assert gitc(run, "log", "-1", fmt, h.commit) == "Grace Hopper <grace@example.org>|adrs-archive"
    assert gitc(run, "log", "-1", fmt, m.commit) == "adrs-model <model@adrs.invalid>|adrs-archive"
    assert gitc(run, "log", "-1", fmt, s.commit) == "adrs-seed <seed@adrs.invalid>|adrs-archive"
    assert gitc(run, "log", "-1", fmt, o.commit).startswith("Alan <alan@example.org>")


def test_next_iteration_sees_other_writers_and_packed_refs_without_git_processes(run: Path) -> None:
    """next_iteration reads the ref files itself (the loop asks several times per iteration): a
    candidate another writer added counts at once, and so do refs git has packed."""
    with open_run(run, create=True) as a, open_run(run) as other:
        s = a.add_candidate(SEED_CODE, rec(-0.3), author="seed", summary="seed")
        other.add_candidate("c\n", rec(-0.1), parent=s.id, iteration=7, summary="from another writer")
        assert a.next_iteration() == 8
        loose = Path(a.repo.common_dir) / "refs" / "candidates"
        assert sorted(p.name for p in loose.glob("c*")) == ["c000000", "c000007"]
        gitc(run, "pack-refs", "--all")
        assert not list(loose.glob("c*"))  # only packed-refs now
        assert a.next_iteration() == 8
        a.add_candidate("d\n", rec(-0.1), parent=s.id, summary="after packing")
        assert a.next_iteration() == 9 and sorted(gitstore.candidate_ids(a.repo)) == ["c000000", "c000007", "c000008"]


def test_get_by_id_iteration_commit_and_best(run: Path) -> None:
    with open_run(run, create=True) as a:
        s = a.add_candidate(SEED_CODE, rec(-0.3), author="seed", summary="seed")
        c = a.add_candidate("c\n", rec(-0.1), parent=s.id, iteration=12, summary="jump")
        assert a.next_iteration() == 13
        for key in (c.id, 12, "12", c.commit[:8], c.commit, "best", c):
            assert a.get(key) == c
        for key in ("c999", 5, "zzz", "deadbeef"):
            with pytest.raises(KeyError):
                a.get(key)
        with pytest.raises(ArchiveError):
            a.add_candidate("dup\n", rec(-0.1), iteration=12)
        with pytest.raises(KeyError):
            a.add_candidate("orphan\n", rec(-0.1), parent="c000077")


def _populate(a, n: int = 25) -> None:
    prev = a.add_candidate(SEED_CODE, rec(-0.5), author="seed", summary="seed")
    for i in range(1, n):
        score = None if i % 6 == 5 else -0.5 + 0.37 * ((i * 7919) % 13) / 13
        prev = a.add_candidate(f"v = {i}\n", rec(score), parent=prev.id if i % 3 else "c000000",
                               island=i % 3, summary=f"step {i}")
    a.mark_rejected(a.best(), "overfits the workload")


def test_corrupt_or_deleted_index_is_rebuilt(run: Path) -> None:
    with open_run(run, create=True) as a:
        _populate(a)
        before, board = a.all(), a.leaderboard(10)
        best = a.best()
    assert len(before) == 25 and any(r.status == "rejected" for r in before)

    (run / "index.sqlite").write_bytes(b"\x00garbage\xff" * 4096)  # corrupt
    with pytest.raises(sqlite3.DatabaseError):
        index.connect(run / "index.sqlite")
    with open_run(run) as a:  # detected on open, discarded, rebuilt from git
        assert a.all() == before and a.leaderboard(10) == board and a.best() == best

    (run / "index.sqlite").unlink()  # deleted
    assert reindex(run) == 25
    with open_run(run) as a:
        assert a.all() == before and a.leaderboard(10) == board
        assert a.reindex() == 25 and a.all() == before


def test_recover_after_partial_writes(run: Path) -> None:
    with open_run(run, create=True) as a:
        s = a.add_candidate(SEED_CODE, rec(-0.3), author="seed", summary="seed")
        # 1) killed after the git commit + ref, before the index row (and before `best` moved).
        meta = Meta(candidate_id(1), 1, 0, s.id, "model", "committed, not indexed", 1.0e9)
        sha = gitstore.write_commit(a.repo, "y\n", meta, rec(-0.01), commit_message(meta, rec(-0.01), s.commit),
                                    s.commit, Identity("adrs-model", "model@adrs.invalid"))
        gitstore.create_ref(a.repo, meta.id, sha)
        # 2) killed after writing objects but before the ref: an unreachable commit, not a candidate.
        meta2 = Meta(candidate_id(2), 2, 0, s.id, "model", "never referenced", 1.0e9)
        gitstore.write_commit(a.repo, "z\n", meta2, rec(-0.001), "x\n", s.commit, Identity("m", "m@x"))
        # 3) an index row whose commit never made it into git.
        ghost = a.get(s.id).__class__(**{**a.get(s.id).__dict__, "id": "c000009", "iteration": 9,
                                         "commit": "0" * 40, "combined_score": 1.0})
        index.insert(a.conn, ghost)
        # 4) a stale lock left by a killed `git update-ref`, and a rejection whose index update was lost.
        (run / "repo" / "refs" / "candidates" / "c000002.lock").write_text("")
        gitstore.add_rejection(a.repo, s.commit, "found in review", Identity("Ada", "ada@example.org"), 1.0e9)

    with open_run(run) as a:
        rep = a.recover()  # open_run already recovered: a second pass finds nothing to do
        assert rep.clean
        assert [r.id for r in a.all()] == ["c000000", "c000001"]
        assert a.get(1).commit == sha and a.get(1).summary == "committed, not indexed"
        assert a.get(0).status == "rejected" and a.get(0).reject_reason == "found in review"
        assert a.best().id == "c000001" and gitstore.ref_target(a.repo, gitstore.BEST_REF) == sha
        assert a.next_iteration() == 2
        assert a.add_candidate("w\n", rec(-0.2), parent=1, summary="resumed").iteration == 2  # lock was cleared


def test_a_commit_skips_the_full_recovery_only_while_git_is_as_the_index_last_matched(
        run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before each write the archive makes its index agree with git; that pass (git processes and
    every index row) is skipped while only its own writes changed git, and still repairs what
    another writer left half done: a ref without a row, a rejection note without its index update,
    a stale lock."""
    passes = []
    real = gitstore.refs_snapshot
    monkeypatch.setattr(gitstore, "refs_snapshot", lambda repo: passes.append(1) or real(repo))
    with open_run(run, create=True) as a:
        s = a.add_candidate(SEED_CODE, rec(-0.3), author="seed", summary="seed")
        before = len(passes)
        a.add_candidate("b\n", rec(-0.2), parent=s.id)
        a.add_candidate("c\n", rec(-0.25), parent=s.id)
        assert len(passes) == before and a.best().id == "c000001"  # only our own writes: no full pass
        # Another writer died after its commit and ref, before the index row.
        meta = Meta(candidate_id(3), 3, 0, s.id, "model", "committed, not indexed", 1.0e9)
        sha = gitstore.write_commit(a.repo, "y\n", meta, rec(-0.01), commit_message(meta, rec(-0.01), s.commit),
                                    s.commit, Identity("adrs-model", "model@adrs.invalid"))
        gitstore.create_ref(a.repo, meta.id, sha)
        d = a.add_candidate("d\n", rec(-0.2), parent=s.id)
        assert len(passes) == before + 1 and d.iteration == 4
        assert a.get(3).commit == sha and a.best().id == "c000003"
        # Another writer died after its rejection note, before the index update.
        gitstore.add_rejection(a.repo, sha, "found in review", Identity("Ada", "ada@example.org"), 1.0e9)
        a.add_candidate("e\n", rec(-0.2), parent=s.id)
        assert len(passes) == before + 2
        assert a.get(3).status == "rejected" and a.best().id == "c000001"
        # A killed `git update-ref` left the lock of the next candidate's ref.
        (run / "repo" / "refs" / "candidates" / "c000006.lock").write_text("")
        assert a.add_candidate("f\n", rec(-0.2), parent=s.id).iteration == 6
        assert len(passes) == before + 3
        a.add_candidate("g\n", rec(-0.2), parent=s.id)
        assert len(passes) == before + 3
    with open_run(run) as fresh:  # a full pass agrees with what the skipped ones left
        assert fresh.recovery.clean and fresh.recover().clean and len(fresh.all()) == 8


def test_recover_report(run: Path) -> None:
    with open_run(run, create=True) as a:
        s = a.add_candidate(SEED_CODE, rec(-0.3), author="seed", summary="seed")
        a.conn.execute("DELETE FROM candidates")
        rep = a.recover()
        assert rep.inserted == (s.id,) and rep.best == s.id and not rep.clean


def test_create_killed_half_way_is_redone(run: Path) -> None:
    # A kill during repository creation leaves only a temp dir, never a half-made repo/.
    (run / "repo.tmp-99999" / "objects").mkdir(parents=True)
    with pytest.raises(FileNotFoundError):
        open_run(run)
    with open_run(run, create=True) as a:
        assert a.repo.bare and not (run / "repo.tmp-99999").exists()
        a.add_candidate(SEED_CODE, rec(-0.3), author="seed", summary="seed")
    with open_run(run, create=True) as a:  # create on an existing run just opens it
        assert len(a.all()) == 1 and a.recovery.clean


def test_human_identity_falls_back_to_user(monkeypatch: pytest.MonkeyPatch) -> None:
    from adrs.archive import human_identity

    monkeypatch.setenv("USER", "grace")
    assert human_identity(None, None) == Identity("grace", "grace@localhost")
    assert human_identity("Grace Hopper", "g@example.org") == Identity("Grace Hopper", "g@example.org")


def test_readonly_handle_follows_a_writer_without_its_lock(run: Path) -> None:
    """A reader (the web view) syncs from git alone while another handle writes; no lock is taken."""
    from adrs.archive import open_run_readonly, sync_readonly

    with open_run(run, create=True) as writer:
        seed = writer.add_candidate(SEED_CODE, rec(-0.3), author="seed", summary="seed")
        reader = open_run_readonly(run)
        assert [r.id for r in reader.all()] == [seed.id] and not sync_readonly(reader)
        child = writer.add_candidate("a\n", rec(-0.1), parent=seed.id, summary="better")
        writer.add_candidate("b\n", rec(None), parent=seed.id, summary="failed")
        assert sync_readonly(reader)
        assert [(r.id, r.status) for r in reader.all()] == [(seed.id, "valid"), (child.id, "valid"), ("c000002", "failed")]
        assert reader.best().id == child.id
        writer.mark_rejected(child, "overfits")
        assert sync_readonly(reader) and not sync_readonly(reader)
        assert reader.get(child.id).status == "rejected" and reader.get(child.id).reject_reason == "overfits"
        assert reader.best().id == seed.id
        # While a writer holds the lock, the reader still syncs (flock would block it: run_lock is not re-entrant).
        writer.add_candidate("c\n", rec(-0.2), parent=seed.id, summary="third")
        done = []
        with run_lock(run):
            thread = threading.Thread(target=lambda: done.append(sync_readonly(reader)))
            thread.start()
            thread.join(20)
        assert done == [True] and len(reader.all()) == 4
        reader.close()
