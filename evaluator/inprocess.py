"""Score a candidate in the calling process: the reference path the sandbox must match exactly.

Only for trusted code (seeds, tests, benchmarks): candidate code runs with the caller's
privileges. Untrusted candidates go through ``evaluator.sandbox``.
"""
from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any

from evaluator.candidate import load_masker, masker_input
from evaluator.scoring import InvalidSelection, ScoreReport, aggregate, score_record
from evaluator.workload import Workload


def score_masker(masker: Any, workload: Workload, density_target: float) -> ScoreReport:
    """Run ``masker`` on every record of ``workload`` and score it (exceptions become failures)."""
    t0 = time.perf_counter()
    rows = []
    for rec in workload.records:
        try:
            selection = masker(masker_input(rec, density_target, workload.spec.seed))
        except Exception as exc:  # noqa: BLE001 - a candidate's bug becomes a structured failure
            return ScoreReport.failure(
                "exception", f"{type(exc).__name__}: {exc} (sample {rec.sample}, layer {rec.layer})",
                details=traceback.format_exc(limit=8), workload=workload.label,
            )
        try:
            rows.append((rec.sample, rec.layer, *score_record(rec, selection)))
        except InvalidSelection as exc:
            return ScoreReport.failure("invalid", f"sample {rec.sample}, layer {rec.layer}: {exc}", workload=workload.label)
    report = aggregate(rows, density_target)
    report.workload = workload.label
    report.wall_s = time.perf_counter() - t0
    return report


def score_file(path: str | Path, workload: Workload, density_target: float) -> ScoreReport:
    """Load a candidate file and score it in process."""
    t0 = time.perf_counter()
    try:
        source = Path(path).read_text()
        compile(source, str(path), "exec")
    except SyntaxError as exc:
        return ScoreReport.failure("syntax", f"line {exc.lineno}: {exc.msg}", workload=workload.label)
    try:
        masker = load_masker(path)
    except Exception as exc:  # noqa: BLE001
        return ScoreReport.failure("import", f"{type(exc).__name__}: {exc}", details=traceback.format_exc(limit=8), workload=workload.label)
    report = score_masker(masker, workload, density_target)
    report.wall_s = time.perf_counter() - t0
    return report
