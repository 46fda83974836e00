"""Scoring candidate code for the loop: sandboxed by default, with the held-out cascade."""
from __future__ import annotations

import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

from adrs.config import RunConfig
from evaluator.scoring import ScoreReport
from evaluator.workload import Workload, load_workload


@dataclass
class CodeScorer:
    """Scores code strings on the run's workloads; the held-out workload loads on first use."""

    config: RunConfig
    workload: Workload
    _heldout: Workload | None = None
    _pool: Any = None
    # Held-out reports by candidate id: the best is compared against many challengers.
    _heldout_reports: dict[str, ScoreReport] = field(default_factory=dict)
    # One sandboxed evaluation at a time on this device; the pool's warm spare hides start-up.
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def score(self, code: str, heldout: bool = False) -> ScoreReport:
        """Fast score of ``code`` on the search (or held-out) workload."""
        wl = self.heldout_workload() if heldout else self.workload
        with tempfile.TemporaryDirectory(prefix="adrs-cand-") as tmp:
            path = Path(tmp) / "candidate.py"
            path.write_text(code)
            if self.config.evaluation.in_process:
                from evaluator.inprocess import score_file

                return score_file(path, wl, self.config.density_target)
            from evaluator.sandbox import SandboxLimits, WorkerPool, evaluate_in_sandbox

            with self._lock:
                if self._pool is None:
                    limits = SandboxLimits(wall_s=self.config.evaluation.timeout_s, memory_mb=self.config.evaluation.memory_mb)
                    self._pool = WorkerPool(limits, cuda=wl.records[0].queries.device.type == "cuda")
                return evaluate_in_sandbox(path, wl, self.config.density_target, pool=self._pool)

    def close(self) -> None:
        """Stop the warm spare worker."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def heldout_score(self, candidate_id: str, code: str) -> ScoreReport:
        """Held-out score of an archived candidate, computed once per scorer."""
        if candidate_id not in self._heldout_reports:
            self._heldout_reports[candidate_id] = self.score(code, heldout=True)
        return self._heldout_reports[candidate_id]

    def heldout_workload(self) -> Workload:
        spec = self.config.heldout_spec()
        if spec is None:
            raise ValueError("this run has no held-out workload (heldout_workload: null)")
        if self._heldout is None:
            self._heldout = load_workload(spec, progress=False)
        return self._heldout


def make_scorer(config: RunConfig, progress: bool = True) -> CodeScorer:
    """Load (capturing if needed) the search workload."""
    return CodeScorer(config, load_workload(config.workload_spec(), progress=progress))
