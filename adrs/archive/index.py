"""The SQLite index: a derived, disposable copy of what the leaderboard queries.

It can always be rebuilt from git (see :func:`adrs.archive.store.reindex`), so it never holds
anything git does not. WAL mode lets readers (a dashboard, the CLI) run while a writer adds.
"""
from __future__ import annotations

import sqlite3
from dataclasses import astuple, fields
from pathlib import Path

from adrs.archive.model import CandidateRef

SCHEMA = """
CREATE TABLE IF NOT EXISTS candidates (
    id             TEXT PRIMARY KEY,
    "commit"       TEXT NOT NULL UNIQUE,
    parent_id      TEXT,
    iteration      INTEGER NOT NULL UNIQUE,
    island         INTEGER NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('valid', 'failed', 'rejected')),
    combined_score REAL,
    error          REAL,
    density        REAL,
    category       TEXT,
    author         TEXT NOT NULL CHECK (author IN ('model', 'human', 'seed')),
    summary        TEXT NOT NULL,
    created        REAL NOT NULL,
    llm_model      TEXT,
    reject_reason  TEXT,
    kv_density     REAL,
    speedup        REAL
);
CREATE INDEX IF NOT EXISTS candidates_rank ON candidates (status, combined_score DESC, iteration);
CREATE INDEX IF NOT EXISTS candidates_island ON candidates (island, status, combined_score DESC);
"""

COLUMNS = tuple(f.name for f in fields(CandidateRef))
_SELECT = "SELECT " + ", ".join(f'"{c}"' for c in COLUMNS) + " FROM candidates"
# Higher combined_score is better; ties go to the earlier candidate so `best` is deterministic.
_RANK = "ORDER BY combined_score DESC, iteration ASC"


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the index; raises sqlite3.DatabaseError if the file is corrupt.

    An index written before a column existed is refused the same way, so the caller rebuilds it
    from git, where every record keeps its numbers. (It must be checked: SQLite reads a
    double-quoted name that is no column as a string literal, so the SELECT alone would pass.)
    """
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)  # explicit transactions only
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives process kills
        conn.executescript(SCHEMA)
        conn.execute(f"{_SELECT} LIMIT 1").fetchall()  # touch the table: corrupt pages fail here
        have = tuple(row[1] for row in conn.execute("PRAGMA table_info(candidates)"))
        if have != COLUMNS:
            raise sqlite3.DatabaseError(f"index columns {have} are not {COLUMNS}: written by another version")
    except sqlite3.DatabaseError:
        conn.close()
        raise
    return conn


def _row(t: tuple) -> CandidateRef:
    return CandidateRef(*t)


def insert(conn: sqlite3.Connection, ref: CandidateRef) -> None:
    cols = ", ".join(f'"{c}"' for c in COLUMNS)
    conn.execute(f"INSERT INTO candidates ({cols}) VALUES ({', '.join('?' * len(COLUMNS))})", astuple(ref))


def delete(conn: sqlite3.Connection, cid: str) -> None:
    conn.execute("DELETE FROM candidates WHERE id = ?", (cid,))


def set_rejected(conn: sqlite3.Connection, cid: str, reason: str | None, status: str) -> None:
    conn.execute("UPDATE candidates SET status = ?, reject_reason = ? WHERE id = ?", (status, reason, cid))


def all_rows(conn: sqlite3.Connection) -> list[CandidateRef]:
    return [_row(t) for t in conn.execute(f"{_SELECT} ORDER BY iteration")]


def best(conn: sqlite3.Connection) -> CandidateRef | None:
    t = conn.execute(f"{_SELECT} WHERE status = 'valid' AND combined_score IS NOT NULL {_RANK} LIMIT 1").fetchone()
    return _row(t) if t else None


def leaderboard(conn: sqlite3.Connection, top_k: int, island: int | None, include_failed: bool) -> list[CandidateRef]:
    where = ["1"] if include_failed else ["status = 'valid'"]
    args: list = []
    if island is not None:
        where.append("island = ?")
        args.append(island)
    # Failed/rejected rows (no score) sort after every scored one.
    order = "ORDER BY combined_score IS NULL, combined_score DESC, iteration ASC"
    sql = f"{_SELECT} WHERE {' AND '.join(where)} {order} LIMIT ?"
    return [_row(t) for t in conn.execute(sql, (*args, top_k))]


def find(conn: sqlite3.Connection, where: str, args: tuple) -> list[CandidateRef]:
    return [_row(t) for t in conn.execute(f"{_SELECT} WHERE {where} ORDER BY iteration LIMIT 2", args)]
