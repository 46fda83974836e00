"""Crash safety and concurrency of the archive, with real processes.

Run as a script (``python tests/test_archive_crash.py worker RUN TARGET``) this file is the
writer that the SIGKILL test starts and kills: a stand-in for the evolution loop that adds
candidates through the public API and resumes at ``next_iteration()``.
"""
from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import git

from adrs.archive import Archive, CandidateRef, gitstore, open_run

ROOT = Path(__file__).resolve().parents[1]


def fake_record(rng: random.Random) -> dict:
    if rng.random() < 0.25:
        return {"valid": False, "category": rng.choice(["timeout", "exception", "invalid"]), "reason": "boom"}
    err = rng.uniform(0.01, 0.5)
    return {"valid": True, "combined_score": -err, "error": err, "density": 0.098,
            "llm": {"model": "offline", "usage": {"prompt_tokens": 10, "completion_tokens": 5}}}


def add_one(a: Archive, rng: random.Random, iteration: int | None) -> CandidateRef:
    ids = [r.id for r in a.all()]
    parent = rng.choice(ids) if ids else None
    return a.add_candidate(
        f"def masker(inp):\n    return {rng.random()!r}\n", fake_record(rng), parent=parent,
        iteration=iteration, island=rng.randrange(2), author="model" if ids else "seed",
        summary=f"random edit {rng.randrange(1000)}",
    )


def worker(run_dir: str, target: int) -> None:
    """Add candidates until ``target``, printing each one only after add_candidate returned."""
    print("S", flush=True)  # imports done: the test times its kill from here
    with open_run(run_dir, create=True) as a:
        if not a.recovery.clean:
            print(f"X {a.recovery}", flush=True)
        while (it := a.next_iteration()) < target:
            rng = random.Random(it)
            ref = add_one(a, rng, it)
            print(f"A {ref.iteration} {ref.commit}", flush=True)
            if rng.random() < 0.1:
                a.mark_rejected(ref, "kill-test review")
                print(f"R {ref.id}", flush=True)


def concurrent_writer(args: tuple[str, int, int]) -> list[tuple[int, str]]:
    run_dir, seed, n = args
    rng = random.Random(seed)
    with open_run(run_dir) as a:
        return [(r.iteration, r.commit) for r in (add_one(a, rng, None) for _ in range(n))]


def check_consistent(run_dir: Path) -> list[CandidateRef]:
    """Index == rebuild from git, no gaps or duplicates, best branch = best valid by score.json."""
    with open_run(run_dir) as a:
        rows = a.all()
        assert [r.iteration for r in rows] == list(range(len(rows))), "gap or duplicate in iterations"
        assert len({r.commit for r in rows}) == len(rows)
        assert gitstore.candidate_refs(a.repo) == {r.id: r.commit for r in rows}
        # The expected best is computed from git (score.json + notes), not from the index.
        rejected = gitstore.rejections(a.repo)
        scored = [(rec["combined_score"], -r.iteration, r.commit) for r in rows
                  for rec in [a.record(r)] if rec["valid"] and r.commit not in rejected]
        expected_best = max(scored)[2] if scored else None
        assert gitstore.ref_target(a.repo, gitstore.BEST_REF) == expected_best
        board = a.leaderboard(20)
        assert a.reindex() == len(rows)
        assert a.all() == rows and a.leaderboard(20) == board
        a.repo.git.fsck("--no-progress", "--strict")  # raises if any object or ref is broken
    return rows


def test_concurrent_writers(tmp_path: Path) -> None:
    run = tmp_path / "run"
    open_run(run, create=True).close()
    n_proc, per = 4, 8
    with multiprocessing.get_context("fork").Pool(n_proc) as pool:
        results = pool.map(concurrent_writer, [(str(run), s, per) for s in range(n_proc)])
    acked = sorted(x for r in results for x in r)
    rows = check_consistent(run)
    assert [(r.iteration, r.commit) for r in rows] == acked
    assert len(rows) == n_proc * per


def _run_worker(run: Path, target: int, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(out, "w") as fh:
        return subprocess.Popen([sys.executable, __file__, "worker", str(run), str(target)],
                                stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env)


def test_sigkill_at_random_moments_then_resume(tmp_path: Path) -> None:
    run, rng = tmp_path / "run", random.Random(1234)
    acked: dict[int, str] = {}
    rejected: set[str] = set()
    repairs: list[str] = []  # what each resume had to fix (depends on where the kill landed)
    kills = attempts = 0

    def read_acks(out: Path) -> None:
        for line in out.read_text().splitlines(keepends=True):
            if not line.endswith("\n"):
                continue  # torn by the kill
            parts = line.split()
            if parts[0] == "A":
                assert int(parts[1]) not in acked, f"iteration {parts[1]} written twice"
                acked[int(parts[1])] = parts[2]
            elif parts[0] == "R":
                rejected.add(parts[1])
            elif parts[0] == "S":
                pass
            elif parts[0] == "X":
                repairs.append(line.strip())
            else:
                raise AssertionError(f"worker said: {line}")

    while kills < 10 and attempts < 40:
        attempts += 1
        out = tmp_path / f"out{attempts}.txt"
        proc = _run_worker(run, 10**6, out)
        deadline = time.monotonic() + 30
        while not out.read_text().startswith("S") and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # wait out interpreter start-up, which varies with machine load
        # From here: open_run (repo creation, recover) then adds, ~30 ms each; kill anywhere in it.
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        assert proc.wait(timeout=30) in (-signal.SIGKILL, 0), out.read_text()
        read_acks(out)
    assert kills >= 10

    # Resume to completion: it continues at next_iteration() and stops cleanly.
    with open_run(run, create=True) as a:
        start = a.next_iteration()
    out = tmp_path / "final.txt"
    proc = _run_worker(run, start + 3, out)
    assert proc.wait(timeout=60) == 0, out.read_text()
    read_acks(out)
    assert sorted(acked)[-3:] == [start, start + 1, start + 2]

    rows = check_consistent(run)
    by_it = {r.iteration: r for r in rows}
    for it, commit in acked.items():  # nothing acknowledged was lost
        assert by_it[it].commit == commit
    for cid in rejected:
        assert next(r for r in rows if r.id == cid).status == "rejected"
    assert len(rows) >= len(acked)  # unacknowledged-but-committed candidates are kept too
    print(f"{kills} kills, {len(rows)} candidates, resumes that repaired something: {repairs}")


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(sys.argv[2], int(sys.argv[3]))
