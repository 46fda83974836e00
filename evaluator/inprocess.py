"""Score a candidate in the calling process: the reference path the sandbox must match exactly.

Only for trusted code (seeds, tests, benchmarks): candidate code runs with the caller's
privileges. Untrusted candidates go through ``evaluator.sandbox``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from evaluator.candidate import format_traceback, load_masker, masker_input
from evaluator.batch_scoring import RecordInvalid, RecordScorer, SelectionHook, plain_weights
from evaluator.scoring import InvalidSelection, ScoreReport, aggregate
from evaluator.threads import evaluation_threads, torch_threads
from evaluator.workload import Workload


IN_PROCESS = "in-process (no sandbox: trusted code only)"

def score_masker(
    masker: Any, workload: Workload, density_target: float,
    *, on_selection: SelectionHook | None = None,
) -> ScoreReport:
    """Run ``masker`` on every record of ``workload`` and score it (exceptions become failures).

    ``on_selection`` receives ``(record index, record, validated float32 weights)``, as in the sandbox.
    """
    device = workload.records[0].queries.device if workload.records else torch.device("cpu")
    with torch_threads(evaluation_threads(device)):  # as the sandbox's worker has
        return _score_masker(masker, workload, density_target, on_selection)


def _score_masker(masker: Any, workload: Workload, density_target: float, on_selection: SelectionHook | None) -> ScoreReport:
    t0 = time.perf_counter()
    scorer = RecordScorer(workload.records, on_selection)
    try:
        for i, rec in enumerate(workload.records):
            try:
                selection = masker(masker_input(rec, density_target, workload.spec.seed))
            except Exception as exc:  # noqa: BLE001 - a candidate's bug becomes a structured failure
                failure = ScoreReport.failure(
                    "exception", f"{type(exc).__name__}: {exc} (sample {rec.sample}, layer {rec.layer})",
                    details=format_traceback(), workload=workload.label,
                )
                scorer.flush()  # an invalid earlier record is reported first, as when scored one by one
                return failure
            try:
                weights = plain_weights(selection, rec)
            except InvalidSelection as exc:
                scorer.flush()
                return ScoreReport.failure("invalid", f"sample {rec.sample}, layer {rec.layer}: {exc}", workload=workload.label)
            scorer.add(i, weights)
        rows = scorer.rows()
    except RecordInvalid as exc:
        return ScoreReport.failure("invalid", f"{exc.where}: {exc}", workload=workload.label)
    report = aggregate(rows, density_target)
    report.workload = workload.label
    report.wall_s = time.perf_counter() - t0
    report.isolation = IN_PROCESS
    return report


def score_file(
    path: str | Path, workload: Workload, density_target: float,
    *, on_selection: SelectionHook | None = None,
) -> ScoreReport:
    """Load a candidate file and score it in process (``on_selection`` as in ``score_masker``)."""
    t0 = time.perf_counter()
    try:
        source = Path(path).read_text()
        compile(source, str(path), "exec")
    except SyntaxError as exc:
        return ScoreReport.failure("syntax", f"line {exc.lineno}: {exc.msg}", workload=workload.label)
    try:
        masker = load_masker(path)
    except Exception as exc:  # noqa: BLE001
        return ScoreReport.failure("import", f"{type(exc).__name__}: {exc}", details=format_traceback(), workload=workload.label)
    report = score_masker(masker, workload, density_target, on_selection=on_selection)
    report.wall_s = time.perf_counter() - t0
    report.isolation = IN_PROCESS
    return report
