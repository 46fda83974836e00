"""Committing a scored candidate: the numerics audit, the held-out cascade, the archive write, its checkpoint.

Shared by the loop, agent mode and hand patches, so every way into the archive applies the
same checks: a candidate that beats the best is re-scored in float64 and on the held-out
workload, and a gain that disappears there is flagged (never best, never parent).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adrs import review
from adrs.archive.store import Archive
from adrs.config import RunConfig
from adrs.evaluate import CodeScorer
from adrs.mutation import MutationResult
from evaluator.scoring import ScoreReport


@dataclass(frozen=True)
class Child:
    """A scored proposal, ready to commit."""

    parent_id: str
    island: int
    code: str
    report: ScoreReport
    mutation: MutationResult
    llm: dict[str, Any] | None = None
    prompt: str | None = None
    response: str | None = None
    transcript: tuple[dict[str, Any], ...] = ()


def _record(child: Child, scorer: CodeScorer) -> dict[str, Any]:
    data = child.report.to_dict()
    data["mutation"] = {"kind": child.mutation.kind, "summary": child.mutation.summary, "error": child.mutation.error}
    data["workload_hash"] = scorer.workload.hash
    if child.llm:
        data["llm"] = child.llm
    if child.prompt is not None:
        data["prompt"] = child.prompt
        data["response"] = child.response
    if child.transcript:
        data["transcript"] = list(child.transcript)
    return data


def ensure_seed(archive: Archive, cfg: RunConfig, scorer: CodeScorer, base: Path) -> None:
    """Commit the seed candidate as iteration 0 if the archive is empty."""
    if archive.next_iteration() > 0:
        return
    path = Path(cfg.seed_candidate)
    if not path.is_absolute() and not path.exists():
        path = base / path
    code = path.read_text()
    report = scorer.score(code)
    record = report.to_dict() | {"workload_hash": scorer.workload.hash, "mutation": {"kind": "seed", "summary": path.name}}
    archive.add_candidate(code, record, parent=None, iteration=0, island=0, author="seed", summary=f"seed: {path.name}")


def code_hash(code: str) -> str:
    """Identity of a candidate's code, to skip re-evaluating what the archive already holds."""
    return hashlib.sha256(code.encode()).hexdigest()


def archived_hashes(archive: Archive) -> set[str]:
    return {code_hash(archive.code(r.id)) for r in archive.all()}


@dataclass(frozen=True)
class CheckPlan:
    """What a child's checks need from the archive, read on the thread that owns it (``plan_checks``);
    the checks themselves (``run_checks``) only score, so they may run on another thread meanwhile."""

    best_id: str | None = None
    best_score: float = 0.0
    best_speedup: float | None = None
    audit: bool = False  # the child beats the best: audit it in float64
    best_audit: dict[str, Any] | None = None  # the best's float64 report, if already known
    cascade: bool = False  # the child beats the best by the held-out margin
    best_heldout: dict[str, Any] | None = None  # the best's held-out report, if already known
    best_code: str | None = None  # only when one of the best's reports is still to be made


@dataclass
class CheckResult:
    """What the checks found: the child's extra reports, the best's new ones, and why the child is flagged."""

    audit: dict[str, Any] | None = None
    heldout: dict[str, Any] | None = None
    best_audit: dict[str, Any] | None = None  # new: to note on the best
    best_heldout: dict[str, Any] | None = None  # new: to note on the best
    rejection: str | None = None


def plan_checks(archive: Archive, scorer: CodeScorer, child: Child) -> CheckPlan:
    """Which re-scores ``child`` needs against the archive's current best (reads the archive only)."""
    best = archive.best()
    if not child.report.valid or best is None or child.report.combined_score <= best.combined_score:
        return CheckPlan()
    ev = scorer.config.evaluation
    audit = ev.numerics_audit
    cascade = (scorer.config.heldout_spec() is not None
               and child.report.combined_score > best.combined_score + ev.heldout_margin)
    best_audit = report_of(archive, best.id, audit_key(scorer), "audit") if audit else None
    best_heldout = heldout_of(archive, best.id, scorer.heldout_workload().hash) if cascade else None
    need_code = (audit and best_audit is None) or (cascade and best_heldout is None)
    return CheckPlan(best.id, best.combined_score, _speedup_of(archive, best.id), audit, best_audit, cascade,
                     best_heldout, archive.code(best.id) if need_code else None)


def run_checks(scorer: CodeScorer, child: Child, plan: CheckPlan) -> CheckResult:
    """The numerics audit, then (if it passes) the held-out cascade; scores only, touches no archive."""
    result = CheckResult()
    result.rejection = _audit(scorer, child, plan, result) or _cascade(scorer, child, plan, result)
    return result


def _audit(scorer: CodeScorer, child: Child, plan: CheckPlan, result: CheckResult) -> str | None:
    """Numerics audit: re-score a candidate that beats the best in float64; the reason if its gain disappears there.

    A gain that exists only in float32 (the estimator's rounding, not the selection) must not
    make a candidate the best or a parent, however small it is.
    """
    if not plan.audit:
        return None
    audited = scorer.audit_score(child.code, child.report.speedup)
    result.audit = audited.to_dict()
    best_audit = plan.best_audit
    if best_audit is None:
        assert plan.best_code is not None
        best_audit = result.best_audit = scorer.audit_score(plan.best_code, plan.best_speedup).to_dict()
    if not audited.valid:
        return f"numerics audit: the float64 re-score failed ({audited.category}: {audited.reason})"
    if best_audit.get("valid") and audited.combined_score <= best_audit["combined_score"] + scorer.config.evaluation.audit_tolerance:
        return (f"numerics audit: the gain disappears in float64 ({audited.combined_score:.10f} vs the best's "
                f"{best_audit['combined_score']:.10f}; float32: {child.report.combined_score:.10f} vs {plan.best_score:.10f})")
    return None


def _cascade(scorer: CodeScorer, child: Child, plan: CheckPlan, result: CheckResult) -> str | None:
    """Re-score a candidate that beats the best on the held-out workload; the reason if it fails to confirm."""
    if not plan.cascade:
        return None
    held = scorer.score(child.code, heldout=True, speedup=child.report.speedup)
    result.heldout = held.to_dict()
    best_held = plan.best_heldout
    if best_held is None:
        assert plan.best_id is not None and plan.best_code is not None
        best_held = result.best_heldout = scorer.heldout_score(plan.best_id, plan.best_code, plan.best_speedup).to_dict()
    if not held.valid:
        return f"held-out evaluation failed ({held.category}: {held.reason})"
    if best_held.get("valid") and held.combined_score < best_held["combined_score"]:
        return (f"gain does not replicate on held-out: {held.combined_score:.4f} < best's {best_held['combined_score']:.4f}")
    return None


def _speedup_of(archive: Archive, candidate_id: str) -> float | None:
    """A candidate's decode speedup measured on the search workload (None if not measured)."""
    value = archive.record(candidate_id).get("speedup")
    return float(value) if isinstance(value, (int, float)) else None


def audit_key(scorer: CodeScorer) -> str:
    """What audit notes are keyed by: the search workload, scored in float64."""
    return f"{scorer.workload.hash}/float64"


def rescore_entry(report: dict[str, Any], workload_hash: str, why: str) -> dict[str, Any]:
    """What a re-score note keeps: the report, on which workload, and why it was made."""
    return {"workload_hash": workload_hash, "why": why, "report": report}


def heldout_of(archive: Archive, candidate_id: str, workload_hash: str) -> dict[str, Any] | None:
    """A candidate's held-out report: from its record (cascade) or its newest re-score note."""
    return report_of(archive, candidate_id, workload_hash, "heldout")


def report_of(archive: Archive, candidate_id: str, workload_hash: str, field: str) -> dict[str, Any] | None:
    """A candidate's ``field`` report ("heldout", "audit"): from its record or its newest re-score note."""
    record = archive.record(candidate_id)
    if record.get(field):
        return record[field]
    notes = [n for n in archive.rescores(candidate_id) if n.get("workload_hash") == workload_hash]
    return notes[-1]["report"] if notes else None


def maybe_checkpoint(archive: Archive, cfg: RunConfig, ref: Any, became_best: bool) -> review.Checkpoint | None:
    reason = review.checkpoint_reason(ref.iteration, became_best, cfg.review.every, cfg.review.on_new_best)
    if reason is None:
        return None
    # An every-N checkpoint reviews the best so far; a new-best one reviews the newcomer.
    subject = ref if became_best or archive.best() is None else archive.best()
    return review.make_checkpoint(archive, ref.iteration, subject, reason)


def commit_checked(archive: Archive, scorer: CodeScorer, child: Child, plan: CheckPlan, checks: CheckResult,
                   author: str = "model", summary: str | None = None) -> tuple[Any, str | None]:
    """Write ``child`` with what its checks found (and the best's new re-score notes); its row and
    why it was flagged, if it was. On the archive's thread, with nothing committed since ``plan``."""
    record = _record(child, scorer)
    if checks.audit is not None:
        record["audit"] = checks.audit
    if checks.heldout is not None:
        record["heldout"] = checks.heldout
    if checks.best_audit is not None and plan.best_id is not None:
        archive.add_rescore(plan.best_id, rescore_entry(checks.best_audit, audit_key(scorer), "audit"))
    if checks.best_heldout is not None and plan.best_id is not None:
        archive.add_rescore(plan.best_id, rescore_entry(checks.best_heldout, scorer.heldout_workload().hash, "cascade"))
    ref = archive.add_candidate(child.code, record, parent=child.parent_id, island=child.island, author=author,
                                summary=summary or child.mutation.summary or child.mutation.error or "")
    if checks.rejection:
        ref = archive.mark_rejected(ref, checks.rejection)
    return ref, checks.rejection


def commit_child(archive: Archive, scorer: CodeScorer, child: Child, author: str = "model",
                 summary: str | None = None) -> tuple[Any, str | None]:
    """Numerics audit and held-out cascade, then commit ``child``; returns its row and why it was flagged, if it was."""
    plan = plan_checks(archive, scorer, child)
    return commit_checked(archive, scorer, child, plan, run_checks(scorer, child, plan), author, summary)
