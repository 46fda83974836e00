"""Run untrusted candidates isolated: own process group, limits, no secrets, no network.

``evaluate_in_sandbox(path, workload, density_target, base_seed, limits)`` returns a
ScoreReport whose numbers equal in-process scoring exactly, or a categorised failure
(syntax, import, exception, timeout, memory, invalid, crash, output).

Layers, outermost first (each holds without the ones inside it):

* one fresh worker process per candidate (``python -m evaluator.sandbox.worker``), in its own
  session/process group; on finish or timeout the group is SIGKILLed, then any process that
  left the group but carries the run's environment marker;
* scrubbed environment (no ``*_KEY``/``*_TOKEN``/``*_SECRET``/``*PASSWORD*``/``OPENAI_*``/
  ``ANTHROPIC_*``/``ADRS_LLM_*``), cwd = a fresh scratch directory;
* rlimits: address space (CPU workloads), file size, no core dumps, task count;
* as root: a new network namespace (loopback down) and uid/gid ``nobody`` after the trusted
  prologue, so the candidate can write only its scratch directory;
* an audit hook refusing fork/exec/sockets/signals/writes outside scratch (defence in depth).

Without root the worker tries an unprivileged user+network namespace and otherwise keeps the
host network; it stays the caller's uid (so it could write where the caller can) and
RLIMIT_NPROC is not set (it would count all the user's processes). The audit hook and the
process-group kill still apply. As ``nobody`` the interpreter's own directory may be
unreadable (e.g. under /root): the worker pre-imports torch, numpy and common stdlib modules;
other imports in a candidate then fail as ``import`` failures.
"""
from evaluator.sandbox.limits import SandboxLimits
from evaluator.sandbox.runner import SandboxRun, Worker, WorkerPool, evaluate_in_sandbox, run_candidate

__all__ = ["SandboxLimits", "SandboxRun", "Worker", "WorkerPool", "evaluate_in_sandbox", "run_candidate"]
