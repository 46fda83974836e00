"""Value types of the archive: identities, candidate rows, and the commit message format.

Everything here is a pure function of its inputs so that a rebuild from git produces exactly
the rows that were written the first time.
"""
from __future__ import annotations

import getpass
import math
import os
from dataclasses import dataclass
from typing import Any, Literal, Mapping

AuthorKind = Literal["model", "human", "seed"]
Status = Literal["valid", "failed", "rejected"]

AUTHOR_KINDS: tuple[str, ...] = ("model", "human", "seed")


@dataclass(frozen=True)
class Identity:
    """A git author/committer."""

    name: str
    email: str

    def env(self, role: str = "AUTHOR") -> dict[str, str]:
        """``GIT_<role>_NAME``/``EMAIL`` for porcelain commands (tags, notes)."""
        return {f"GIT_{role}_NAME": self.name, f"GIT_{role}_EMAIL": self.email}

    def __str__(self) -> str:
        return f"{self.name} <{self.email}>"


# Synthetic authors live under .invalid (RFC 2606) so they can never be confused with a person.
MODEL_IDENTITY = Identity("adrs-model", "model@adrs.invalid")
SEED_IDENTITY = Identity("adrs-seed", "seed@adrs.invalid")
ARCHIVE_IDENTITY = Identity("adrs-archive", "archive@adrs.invalid")  # the committer of every candidate


def human_identity(config_name: str | None = None, config_email: str | None = None) -> Identity:
    """The person at the keyboard: git config ``user.name``/``user.email`` if given, else $USER."""
    user = os.environ.get("USER") or os.environ.get("LOGNAME")
    if not user:
        try:
            user = getpass.getuser()
        except Exception:  # no passwd entry in some containers
            user = "human"
    return Identity(config_name or user, config_email or f"{user}@localhost")


def candidate_id(iteration: int) -> str:
    """Ids encode the iteration, so refs alone tell which iterations exist (and they sort)."""
    return f"c{iteration:06d}"


def iteration_of(cid: str) -> int:
    return int(cid[1:])


@dataclass(frozen=True)
class CandidateRef:
    """One row of the index: what the leaderboard and the loop need about a candidate."""

    id: str
    commit: str
    parent_id: str | None
    iteration: int
    island: int
    status: Status
    combined_score: float | None
    error: float | None
    density: float | None
    category: str | None
    author: AuthorKind
    summary: str
    created: float
    llm_model: str | None = None
    reject_reason: str | None = None
    kv_density: float | None = None  # absent from records made before it existed
    speedup: float | None = None  # measured decode speedup (evaluation.speedup), when measured

    @property
    def valid(self) -> bool:
        return self.status == "valid"


@dataclass(frozen=True)
class Meta:
    """Archive bookkeeping stored in score.json under ``"archive"``: the index is derived from it."""

    id: str
    iteration: int
    island: int
    parent_id: str | None
    author: AuthorKind
    summary: str
    created: float

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Meta":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def _num(x: Any) -> float | None:
    """A finite float or None: NaN/inf never reach the leaderboard."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def llm_model(record: Mapping[str, Any]) -> str | None:
    """The LLM model named by a record: ``record["llm"]["model"]`` or ``record["model"]``."""
    llm = record.get("llm")
    if isinstance(llm, Mapping) and llm.get("model"):
        return str(llm["model"])
    return str(record["model"]) if record.get("model") else None


def is_valid(record: Mapping[str, Any]) -> bool:
    return bool(record.get("valid")) and _num(record.get("combined_score")) is not None


def row_from(meta: Meta, record: Mapping[str, Any], commit: str, reject_reason: str | None) -> CandidateRef:
    """The index row for a candidate, computed only from what git holds."""
    valid = is_valid(record)
    status: Status = "rejected" if reject_reason is not None else ("valid" if valid else "failed")
    return CandidateRef(
        id=meta.id, commit=commit, parent_id=meta.parent_id, iteration=meta.iteration, island=meta.island,
        status=status,
        combined_score=_num(record.get("combined_score")) if valid else None,
        error=_num(record.get("error")), density=_num(record.get("density")),
        category=None if valid else str(record.get("category") or "unknown"),
        author=meta.author, summary=meta.summary, created=meta.created,
        llm_model=llm_model(record), reject_reason=reject_reason,
        kv_density=_num(record.get("kv_density")), speedup=_num(record.get("speedup")),
    )


def one_line(text: str, limit: int = 72) -> str:
    """First non-empty line, trimmed to ``limit`` characters (git subject lines stay short)."""
    line = next((s.strip() for s in str(text).splitlines() if s.strip()), "") or "(no summary)"
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _tokens(record: Mapping[str, Any]) -> str | None:
    llm = record.get("llm")
    usage = llm.get("usage") if isinstance(llm, Mapping) else None
    if not isinstance(usage, Mapping):
        return None
    pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return f"{pt} prompt + {ct} completion" if pt is not None or ct is not None else None


def commit_message(meta: Meta, record: Mapping[str, Any], parent_commit: str | None) -> str:
    """``iter 12 [island 1] score -0.0734 (err 0.0734, density 0.098): summary`` plus trailers.

    The subject is for people reading ``git log --oneline``; the trailers repeat the
    bookkeeping in a form ``git interpret-trailers`` understands. score.json stays the source.
    """
    head = f"iter {meta.iteration} [island {meta.island}]"
    if is_valid(record):
        err, dens, speed = _num(record.get("error")), _num(record.get("density")), _num(record.get("speedup"))
        detail = ", ".join(p for p in (
            f"err {err:.4f}" if err is not None else "", f"density {dens:.3f}" if dens is not None else "",
            f"speedup {speed:.2f}x" if speed is not None else "") if p)
        subject = f"{head} score {float(record['combined_score']):.4f}" + (f" ({detail})" if detail else "")
    else:
        subject = f"{head} FAILED ({record.get('category') or 'unknown'})"
    lines = [f"{subject}: {meta.summary}", ""]
    if not is_valid(record) and record.get("reason"):
        lines += [f"Failure: {one_line(str(record['reason']), 200)}", ""]
    trailers = {
        "Candidate": meta.id,
        "Parent": f"{meta.parent_id} ({parent_commit[:10]})" if meta.parent_id and parent_commit else None,
        "Author-Kind": meta.author,
        "Model": llm_model(record),
        "Tokens": _tokens(record),
        "Workload": record.get("workload"),
        "Wall-Time": f"{float(record['wall_s']):.2f}s" if _num(record.get("wall_s")) is not None else None,
    }
    lines += [f"{k}: {v}" for k, v in trailers.items() if v is not None]
    return "\n".join(lines) + "\n"
