"""What a run optimises: error at a density target (the default) or error at a decode-speedup target.

``objective: density`` keeps the published evaluator's combined score,
``-(error + 100 * max(0, density - density_target))``.

``objective: speedup`` (with ``speedup_target: X`` and ``evaluation.speedup: true``) replaces the
density penalty by the same penalty on the measured decode *time*: with ``t = 1 / speedup`` the
sparse decode time as a fraction of dense attention's (the quantity density stands in for),
``speedup_penalty = 100 * max(0, 1/speedup - 1/X)`` and ``combined = -(error + speedup_penalty)``.
A candidate at or above the target pays nothing; one at 3.8x under a 4x target pays
``100 * (1/3.8 - 1/4) = 1.3``, as a candidate 1.3 points of density over its target does.
The speedup is measured once per candidate, on the search workload; the held-out and float64
re-scores of a candidate keep that measurement (they re-check its error, and timing noise must
not decide them).
"""
from __future__ import annotations

from adrs.config import RunConfig
from evaluator.scoring import ScoreReport


def speedup_penalty(speedup: float, target: float) -> float:
    """``100 * max(0, 1/speedup - 1/target)``: decode time over the target's, in percent of dense time."""
    return 100.0 * max(0.0, 1.0 / speedup - 1.0 / target)


def apply_objective(report: ScoreReport, config: RunConfig, speedup: float | None) -> ScoreReport:
    """``report`` ranked by the run's objective. Under ``objective: speedup`` its combined score becomes
    ``-(error + speedup_penalty)`` with ``speedup`` (the candidate's measured one); a valid candidate
    whose speedup could not be measured cannot be ranked and becomes a ``harness`` failure."""
    if config.objective != "speedup" or not report.valid:
        return report
    if speedup is None or not speedup > 0:
        info = report.speedup_info or {}
        why = info.get("error") or info.get("reason") or "no measurement"
        return ScoreReport.failure(
            "harness", f"objective speedup: the candidate's decode speedup was not measured ({why})",
            workload=report.workload, isolation=report.isolation, error=report.error, density=report.density,
            kv_density=report.kv_density, speedup_info=report.speedup_info)
    report.speedup = speedup
    report.speedup_penalty = speedup_penalty(speedup, config.speedup_target)
    report.combined_score = -(report.error + report.speedup_penalty)
    return report
