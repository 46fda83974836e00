"""Run untrusted candidates isolated: own process group, limits, no secrets, no network.

``evaluate_in_sandbox(path, workload, density_target, base_seed, limits)`` returns a
ScoreReport whose numbers equal in-process scoring exactly, or a categorised failure.
"""
from evaluator.sandbox.limits import SandboxLimits
from evaluator.sandbox.runner import SandboxRun, Worker, WorkerPool, evaluate_in_sandbox, run_candidate

__all__ = ["SandboxLimits", "SandboxRun", "Worker", "WorkerPool", "evaluate_in_sandbox", "run_candidate"]
