"""Run untrusted candidates isolated: own namespaces, limits, no secrets, no way out.

``evaluate_in_sandbox(path, workload, density_target, base_seed, limits)`` returns a
ScoreReport whose numbers equal in-process scoring exactly, or a categorised failure
(syntax, import, exception, timeout, memory, invalid, crash, output); ``report.isolation``
says in words how the candidate was contained.

Layers, outermost first (each holds without the ones inside it):

* ``launcher.py`` (stdlib only, single-threaded, before torch is imported) puts every worker
  in new PID, mount, network, IPC and UTS namespaces, through an unprivileged user namespace
  when not root: a read-only root holding only the system libraries, the Python installation
  and the ``evaluator`` package; a private tmpfs capped at ``scratch_bytes`` (+ the output
  cap) for cwd, /tmp and /dev/shm; its own /proc; no network at all. The worker is PID 1 of
  its namespace, so every descendant dies with it, whatever session or environment it made;
  the launcher's supervisor kills it if the harness dies. A seccomp filter (x86-64) refuses
  nested namespaces, ptrace, bpf, io_uring, keyrings, mount and modules. Files (workload inputs, session
  pipes) reach the worker as fds, never as paths; results come back over a pipe (a session's
  failure status through an fd of its tmpfs), every byte capped and checked by the parent.
* Where the kernel allows no namespaces, nothing runs (``IsolationUnavailable``) unless the
  caller opts out explicitly (``SandboxLimits.unsafe_allow_unisolated`` or
  ``ADRS_UNSAFE_ALLOW_UNISOLATED=1``); reports then say ``NOT ISOLATED``.
* scrubbed environment (no ``*_KEY``/``*_TOKEN``/``*_SECRET``/``*PASSWORD*``/``OPENAI_*``/
  ``ANTHROPIC_*``/``ADRS_LLM_*``);
* rlimits: address space (CPU workloads), file size, no core dumps, task count (as root after
  dropping to ``nobody``; as an ordinary user, counted inside its own user namespace);
* as root: uid/gid ``nobody`` after the trusted prologue;
* an audit hook refusing fork/exec/sockets/signals/writes outside scratch (defence in depth);
* the parent SIGKILLs the launcher's process group and anything carrying the run's marker.

As ``nobody`` the interpreter's own directory may be unreadable (e.g. under /root): the worker
pre-imports torch, numpy and common stdlib modules; other imports in a candidate then fail as
``import`` failures.
"""
from evaluator.sandbox.limits import SandboxLimits
from evaluator.sandbox.pool import WorkerPool, auto_spares
from evaluator.errors import IsolationUnavailable
from evaluator.sandbox.runner import SandboxRun, evaluate_in_sandbox, run_candidate
from evaluator.sandbox.worker_process import Worker

__all__ = ["IsolationUnavailable", "SandboxLimits", "SandboxRun", "Worker", "WorkerPool", "auto_spares", "evaluate_in_sandbox",
           "run_candidate"]
