"""The JSON the pages show, computed from a :class:`~adrs.web.runview.RunView`.

Plain data only: the browser renders every string as text (``textContent``), so nothing here
escapes; ``json`` keeps candidate-controlled text exact.
"""
from __future__ import annotations

import difflib
import math
from typing import Any

from adrs import review as rv
from adrs.archive.model import CandidateRef
from adrs.plot import FLAT_DENSITY, score_limits
from adrs.web.runview import RunView

# Record fields that are not one-number scores: shown elsewhere on the candidate page, or too long.
NOT_SCALARS = {"prompt", "response", "transcript", "llm", "per_layer", "heldout", "audit", "worst", "reason"}


def flag_of(ref: CandidateRef) -> str | None:
    """Why a rejected candidate was flagged: 'review', 'numerics', 'heldout' or 'other' (None if not rejected)."""
    if ref.status != "rejected":
        return None
    reason = ref.reject_reason or ""
    if reason.startswith("review:"):
        return "review"
    if reason.startswith("numerics audit"):
        return "numerics"
    return "heldout" if "held-out" in reason else "other"


def _latest(entries: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    hits = [e for e in entries if all(e.get(k) == v for k, v in match.items())]
    return hits[-1].get("report") if hits else None


def _score(report: dict[str, Any] | None) -> float | None:
    if not report or not report.get("valid"):
        return None
    value = report.get("combined_score")
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _row(view: RunView, ref: CandidateRef, notes: dict[str, list[dict[str, Any]]], best_id: str | None,
         checkpointed: set[str]) -> dict[str, Any]:
    entries = notes.get(ref.commit, [])
    record = view.record(ref)  # cached by commit: the held-out report of the cascade lives here
    heldout = record.get("heldout") or (_latest(entries, workload_hash=view.settings.heldout_hash)
                                        if view.settings.heldout_hash else None)
    faithful = _latest(entries, why="faithful")
    return {
        "id": ref.id, "iteration": ref.iteration, "island": ref.island, "status": ref.status,
        "score": ref.combined_score, "error": ref.error, "density": ref.density, "author": ref.author,
        "parent": ref.parent_id, "summary": ref.summary, "category": ref.category, "created": ref.created,
        "reason": ref.reject_reason if ref.status == "rejected" else record.get("reason"),
        "flag": flag_of(ref), "heldout": _score(heldout), "faithful": _score(faithful),
        "faithful_agreement": (faithful or {}).get("agreement"), "best": ref.id == best_id,
        "checkpoint": ref.id in checkpointed, "model": ref.llm_model,
    }


def candidate_rows(view: RunView) -> list[dict[str, Any]]:
    """One dict per candidate (by iteration): scores, held-out and faithful scores, why it failed or was flagged."""
    with view.lock:
        rows = view.rows()
        best = view.archive.best()
        checkpointed = {c.candidate_id for c in rv.checkpoints(view.archive)}
        notes = view.rescores()
        return [_row(view, r, notes, best.id if best else None, checkpointed) for r in rows]


def checkpoints(view: RunView) -> list[dict[str, Any]]:
    """Every review checkpoint with its decision and notes, oldest first."""
    with view.lock:
        found = rv.checkpoints(view.archive)
    return [{"name": c.name, "iteration": c.iteration, "candidate": c.candidate_id, "reason": c.reason,
             "decision": c.decision, "notes": list(c.notes), "pending": c.pending} for c in found]


def _per_minute(created: list[float]) -> list[dict[str, Any]]:
    """Evaluations committed in each minute since the first candidate (empty minutes included)."""
    if not created:
        return []
    start = min(created)
    counts = [0] * (int((max(created) - start) // 60) + 1)
    for t in created:
        counts[int((t - start) // 60)] += 1
    return [{"minute": i, "count": n} for i, n in enumerate(counts)]


def overview(view: RunView) -> dict[str, Any]:
    """The run page's numbers: counts, best, evaluations per minute, failures, spend, checkpoints, y-range."""
    from adrs.spend import run_spend

    rows = candidate_rows(view)
    with view.lock:
        spend = run_spend(view.archive)
        # The sandbox level of the newest scored candidate (a human patch added by hand may lack one).
        isolation = next((iso for ref in reversed(view.rows()) if (iso := view.record(ref).get("isolation"))), None)
    created = [r["created"] for r in rows]
    span_min = (max(created) - min(created)) / 60 if len(created) > 1 else 0.0
    failures: dict[str, int] = {}
    for r in rows:
        if r["status"] == "failed":
            failures[r["category"] or "unknown"] = failures.get(r["category"] or "unknown", 0) + 1
    # The y-range covers search and held-out scores (as `adrs plot`: far-low outliers go to the edge).
    limits = score_limits([r[k] for r in rows for k in ("score", "heldout") if r[k] is not None])
    best = next((r for r in rows if r["best"]), None)
    densities = [r["density"] for r in rows if r["status"] == "valid" and r["density"] is not None]
    # As in `adrs plot`: when every candidate sits at one density, error is shown against iteration.
    flat = bool(densities) and max(densities) - min(densities) <= FLAT_DENSITY * (
        view.settings.density_target or max(densities) or 1)
    total = spend.total
    return {
        "run": view.key, "path": str(view.path), "version": view.version,
        "counts": {s: sum(r["status"] == s for r in rows) for s in ("valid", "failed", "rejected")},
        "total": len(rows), "best": best,
        "evals_per_min": (len(rows) - 1) / span_min if span_min > 0 else None,
        "per_minute": _per_minute(created), "failures": failures,
        "spend": {"calls": total.calls, "prompt_tokens": total.prompt_tokens, "completion_tokens": total.completion_tokens,
                  "tokens": total.total_tokens, "cost_usd": total.cost_usd},
        "isolation": isolation, "flat_density": flat, "y_limits": list(limits) if limits else None,
        "density_target": view.settings.density_target, "workload": view.settings.workload,
        "heldout_workload": view.settings.heldout_name, "checkpoints": checkpoints(view), "rows": rows,
    }


def _scalars(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items()
            if k not in NOT_SCALARS and (v is None or isinstance(v, (str, int, float, bool)))}


def candidate_detail(view: RunView, cand: str) -> dict[str, Any]:
    """Everything the candidate page shows (KeyError for an unknown candidate)."""
    from adrs.agent.transcript import prompt_text

    rows = {r["id"]: r for r in candidate_rows(view)}
    with view.lock:
        ref = view.get(cand)
        record, code = view.record(ref), view.code(ref)
        parent = view.get(ref.parent_id) if ref.parent_id else None
        parent_record = view.record(parent) if parent else {}
        diff = view.diff(parent, ref) if parent else ""
        notes = view.rescores().get(ref.commit, [])
    mine = [c for c in checkpoints(view) if c["candidate"] == ref.id]
    return {
        "run": view.key, "row": rows[ref.id], "commit": ref.commit, "code": code, "diff": diff,
        "scores": _scalars(record), "reason": record.get("reason"), "worst": record.get("worst"),
        "per_layer": record.get("per_layer") or [], "parent": rows.get(parent.id) if parent else None,
        "parent_per_layer": parent_record.get("per_layer") or [], "prompt": prompt_text(record),
        "rescores": [{"why": e.get("why"), "workload_hash": e.get("workload_hash"),
                      "report": _scalars(e.get("report") or {})} for e in notes],
        "checkpoints": mine, "children": [r["id"] for r in rows.values() if r["parent"] == ref.id],
        "ids": list(rows),
    }


def diff_between(view: RunView, a: str, b: str) -> dict[str, Any]:
    """The code diff from candidate ``a`` to ``b`` (KeyError for an unknown one)."""
    with view.lock:
        ra, rb = view.get(a), view.get(b)
        return {"a": ra.id, "b": rb.id, "diff": view.diff(ra, rb)}


def diff_across(a: tuple[RunView, str], b: tuple[RunView, str]) -> dict[str, Any]:
    """A unified diff between candidates of any runs (git cannot diff across repositories)."""
    texts, names = [], []
    for view, cand in (a, b):
        with view.lock:
            ref = view.get(cand)
            texts.append(view.code(ref).splitlines(keepends=True))
        names.append(f"{view.key}:{ref.id}")
    lines = difflib.unified_diff(texts[0], texts[1], f"a/{names[0]}", f"b/{names[1]}")
    return {"a": names[0], "b": names[1], "diff": "".join(lines)}
