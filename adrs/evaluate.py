"""Scoring candidate code for the loop: sandboxed by default, with the held-out cascade."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from adrs.config import RunConfig
from adrs.scheduler import Scheduler, Which, make_scheduler
from evaluator.candidate import candidate_file
from evaluator.scoring import ScoreReport
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
    # Held-out reports by candidate id: the best is compared against many challengers.
    _heldout_reports: dict[str, ScoreReport] = field(default_factory=dict)
    # Guards the lazy scheduler and held-out workload, which concurrent callers may both want.
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # Separate from _lock: scheduler slots load the held-out (and audit) workload from their own threads.
    _heldout_lock: threading.Lock = field(default_factory=threading.Lock)

    def score(self, code: str, heldout: bool = False) -> ScoreReport:
        """Fast score of ``code`` on the search (or held-out) workload."""
        if self.config.evaluation.in_process:
            from evaluator.inprocess import score_file

            wl = self.heldout_workload() if heldout else self.workload
            with candidate_file(code) as path:
                return score_file(path, wl, self.config.density_target)
        if heldout and self.config.heldout_spec() is None:
            raise ValueError("this run has no held-out workload (heldout_workload: null)")
        return self.scheduler().submit(code, "heldout" if heldout else "search").result()

    def faithful(self, code: str, preset: str) -> "FaithfulReport":
        """Faithful score of ``code`` (the model decodes with its selections in every layer), sandboxed unless in_process."""
        from evaluator.faithful import faithful_score
        from evaluator.sandbox import SandboxLimits

        limits = SandboxLimits(wall_s=self.config.evaluation.timeout_s, memory_mb=self.config.evaluation.memory_mb)
        with candidate_file(code) as path:
            return faithful_score(path, preset, self.config.density_target, limits=limits,
                                  in_process=self.config.evaluation.in_process)

    def slots(self) -> int:
        """How many evaluations run at once (1 in process)."""
        return 1 if self.config.evaluation.in_process else self.scheduler().slots

    def scheduler(self) -> Scheduler:
        """The evaluation scheduler, started on first use."""
        with self._lock:
            if self._scheduler is None:
                self._scheduler = make_scheduler(self.config, self._workload_for)
            return self._scheduler

    def audit_score(self, code: str) -> ScoreReport:
        """The numerics audit: ``code`` scored on the search workload with the trusted scorer in float64."""
        if self.config.evaluation.in_process:
            from evaluator.inprocess import score_file

            with candidate_file(code) as path:
                return score_file(path, self.audit_workload(), self.config.density_target)
        return self.scheduler().submit(code, "audit").result()

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
        if scheduler is not None:
            scheduler.close()

    def heldout_score(self, candidate_id: str, code: str) -> ScoreReport:
        """Held-out score of an archived candidate, computed once per scorer."""
        if candidate_id not in self._heldout_reports:
            self._heldout_reports[candidate_id] = self.score(code, heldout=True)
        return self._heldout_reports[candidate_id]

    def heldout_workload(self) -> Workload:
        spec = self.config.heldout_spec()
        if spec is None:
            raise ValueError("this run has no held-out workload (heldout_workload: null)")
        with self._heldout_lock:
            if self._heldout is None:
                self._heldout = load_workload(spec, progress=False)
        return self._heldout


def make_scorer(config: RunConfig, progress: bool = True) -> CodeScorer:
    """Load (capturing if needed) the search workload."""
    return CodeScorer(config, load_workload(config.workload_spec(), progress=progress))
