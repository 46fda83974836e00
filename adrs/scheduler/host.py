"""The trusted harness behind one slot, wherever it runs: in the driver, a slot process, a Ray actor.

``sandboxed_report`` is one candidate's evaluation on a loaded workload, the same on every
backend. ``SlotHost`` adds what a slot outside the driver needs: it loads the run's workloads
from their specs (the node's disk cache) onto its device once and keeps them for every later
candidate, with its own warm sandbox pool.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adrs.scheduler.base import WorkerLost
from evaluator.candidate import candidate_file
from evaluator.sandbox import WorkerPool, run_candidate
from evaluator.scoring import ScoreReport
from evaluator.speedup import SpeedupOptions, with_speedup
from evaluator.workload import Workload, WorkloadSpec, at_precision, load_workload

# Slack on top of the sandbox's own limits before a driver gives up on a slot's harness.
GUARD_MARGIN_S = 120.0


def sandboxed_report(code: str, workload: Workload, density_target: float, pool: WorkerPool,
                     speedup: SpeedupOptions | None) -> ScoreReport:
    """``code`` scored in a sandbox worker from ``pool`` on ``workload``, with its decode speedup when
    ``speedup`` asks (the caller passes None for held-out and audit scores)."""
    with candidate_file(code) as path:
        # The decode speedup times the trusted kernel on the selections the sandbox validated.
        return with_speedup(lambda hook: run_candidate(path, workload, density_target, pool=pool, on_selection=hook).report,
                            workload, speedup)


def lost_if_unstarted(report: ScoreReport) -> ScoreReport:
    """``report``, unless its worker died or hung before it took the job (category ``harness``): no
    candidate code ran, so that raises ``WorkerLost`` and the job is tried again."""
    if report.category == "harness":
        raise WorkerLost(report.reason or "the sandbox worker failed to start")
    return report


@dataclass
class SlotHost:
    """Workloads loaded from specs onto ``pool.device``, scored one candidate at a time."""

    specs: dict[str, WorkloadSpec | None]
    density_target: float
    pool: WorkerPool
    speedup: SpeedupOptions | None = None
    workloads: dict[str, Workload] = field(default_factory=dict)

    def load(self, which: str) -> str:
        """Make sure ``which`` workload is in memory; returns its label."""
        if which not in self.workloads:
            spec = self.specs.get("search" if which == "audit" else which)
            if spec is None:
                raise ValueError(f"this run has no {which} workload")
            workload = load_workload(spec, device=self.pool.device or "cpu", progress=False)
            self.workloads[which] = at_precision(workload, torch.float64) if which == "audit" else workload
        return self.workloads[which].label

    def evaluate(self, code: str, which: str) -> ScoreReport:
        """One candidate on ``which`` workload (loaded first if need be)."""
        self.load(which)
        return sandboxed_report(code, self.workloads[which], self.density_target, self.pool,
                                self.speedup if which == "search" else None)

    def close(self) -> None:
        """Stop the pool's workers."""
        self.pool.close()
