"""Scoring candidate code for the loop: sandboxed by default, with the held-out cascade."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from adrs.config import RunConfig
from adrs.faithful_scorer import FaithfulScorer
from adrs.objective import apply_objective
from adrs.scheduler import Scheduler, Which, make_scheduler, speedup_options
from evaluator.candidate import candidate_file
from evaluator.errors import SpeedupUnavailable
from evaluator.scoring import ScoreReport
from evaluator.speedup import unavailable_reason, with_speedup
from evaluator.workload import Workload, at_precision, load_workload

if TYPE_CHECKING:
    from evaluator.faithful.metrics import FaithfulReport


@dataclass
class CodeScorer:
    """Scores code strings on the run's workloads; the held-out workload loads on first use.

    Sandboxed scoring goes through a scheduler (``evaluation.executor``), started on first use:
    calls from several threads run at the same time, one per GPU or worker.
    """

    config: RunConfig
    workload: Workload
    _heldout: Workload | None = None
    _audit: Workload | None = None
    _scheduler: Scheduler | None = None
    _faithful: FaithfulScorer | None = None  # started on the first faithful score
    # Held-out reports by candidate id: the best is compared against many challengers.
    _heldout_reports: dict[str, ScoreReport] = field(default_factory=dict)
    # Guards the lazy scheduler and held-out workload, which concurrent callers may both want.
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # Separate from _lock: scheduler slots load the held-out (and audit) workload from their own threads.
    _heldout_lock: threading.Lock = field(default_factory=threading.Lock)

    def score(self, code: str, heldout: bool = False, speedup: float | None = None) -> ScoreReport:
        """Fast score of ``code`` on the search (or held-out) workload, ranked by the run's objective.

        On the search workload the decode speedup is measured when ``evaluation.speedup`` is on; a
        held-out score is ranked with ``speedup``, the candidate's search measurement (see adrs.objective).
        """
        if self.config.evaluation.in_process:
            from evaluator.inprocess import score_file

            wl = self.heldout_workload() if heldout else self.workload
            options = None if heldout else speedup_options(self.config)
            with candidate_file(code) as path:
                report = with_speedup(lambda hook: score_file(path, wl, self.config.density_target, on_selection=hook),
                                      wl, options)
        else:
            if heldout and self.config.heldout_spec() is None:
                raise ValueError("this run has no held-out workload (heldout_workload: null)")
            report = self.scheduler().submit(code, "heldout" if heldout else "search").result()
        return apply_objective(report, self.config, speedup if heldout else report.speedup)

    def faithful(self, code: str, preset: str) -> "FaithfulReport":
        """Faithful score of ``code`` (the model decodes with its selections in every layer), sandboxed
        unless in_process; each preset's context and a warm worker are kept for the next call."""
        from evaluator.sandbox import SandboxLimits

        with self._lock:
            if self._faithful is None:
                limits = SandboxLimits(wall_s=self.config.evaluation.timeout_s, memory_mb=self.config.evaluation.memory_mb)
                self._faithful = FaithfulScorer(limits, self.config.density_target, self.config.evaluation.in_process)
        return self._faithful.score(code, preset)

    def slots(self) -> int:
        """How many evaluations run at once (1 in process)."""
        return 1 if self.config.evaluation.in_process else self.scheduler().slots

    def scheduler(self) -> Scheduler:
        """The evaluation scheduler, started on first use."""
        with self._lock:
            if self._scheduler is None:
                self._scheduler = make_scheduler(self.config, self._workload_for)
            return self._scheduler

    def audit_score(self, code: str, speedup: float | None = None) -> ScoreReport:
        """The numerics audit: ``code`` scored on the search workload with the trusted scorer in float64
        (ranked with ``speedup``, the candidate's search measurement, under a speedup objective)."""
        if self.config.evaluation.in_process:
            from evaluator.inprocess import score_file

            with candidate_file(code) as path:
                report = score_file(path, self.audit_workload(), self.config.density_target)
        else:
            report = self.scheduler().submit(code, "audit").result()
        return apply_objective(report, self.config, speedup)

    def audit_workload(self) -> Workload:
        """The search workload with float64 dense references and float64 scoring, made on first use."""
        with self._heldout_lock:
            if self._audit is None:
                self._audit = at_precision(self.workload, torch.float64)
        return self._audit

    def _workload_for(self, which: Which) -> Workload:
        if which == "audit":
            return self.audit_workload()
        return self.heldout_workload() if which == "heldout" else self.workload

    def close(self) -> None:
        """Stop the evaluation workers."""
        with self._lock:
            scheduler, self._scheduler = self._scheduler, None
            faithful, self._faithful = self._faithful, None
        if scheduler is not None:
            scheduler.close()
        if faithful is not None:
            faithful.close()

    def heldout_score(self, candidate_id: str, code: str, speedup: float | None = None) -> ScoreReport:
        """Held-out score of an archived candidate, computed once per scorer (``speedup`` as in ``score``)."""
        if candidate_id not in self._heldout_reports:
            self._heldout_reports[candidate_id] = self.score(code, heldout=True, speedup=speedup)
        return self._heldout_reports[candidate_id]

    def heldout_workload(self) -> Workload:
        spec = self.config.heldout_spec()
        if spec is None:
            raise ValueError("this run has no held-out workload (heldout_workload: null)")
        with self._heldout_lock:
            if self._heldout is None:
                self._heldout = load_workload(spec, progress=False)
        return self._heldout


def speedup_note(config: RunConfig) -> str | None:
    """Why ``evaluation.speedup`` will record no numbers on this machine (shown once at start), or None.

    Local evaluation needs CUDA and Triton here; a Ray cluster's GPUs are its own, so nothing is
    checked for it. Without them, ``objective: speedup`` raises SpeedupUnavailable (the run cannot
    rank anything), while ``evaluation.speedup`` alone scores as usual and records why it measured nothing.
    """
    if not config.evaluation.speedup or config.evaluation.executor == "ray":
        return None
    reason = unavailable_reason()
    if reason is None:
        return None
    if config.objective == "speedup":
        raise SpeedupUnavailable(f"objective: speedup needs a measured decode speedup, but {reason}")
    return f"evaluation.speedup: no decode speedup is recorded on this machine ({reason})"


def make_scorer(config: RunConfig, progress: bool = True) -> CodeScorer:
    """Load (capturing if needed) the search workload; SpeedupUnavailable first if the objective cannot be measured."""
    speedup_note(config)
    return CodeScorer(config, load_workload(config.workload_spec(), progress=progress))
