"""Resource limits of one sandboxed evaluation."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class SandboxLimits:
    """What one candidate may use.

    wall_s: wall-clock seconds for the candidate itself (import + every masker call), counted
        from the moment the job is handed to a ready worker; interpreter and torch start-up is
        bounded separately by ``startup_s`` so a slow import cannot eat the candidate's budget.
    memory_mb: address space (RLIMIT_AS) the candidate may add on CPU, on top of what the
        worker's trusted prologue mapped (torch, its inputs). Not applied on CUDA
        workloads, where the driver reserves huge virtual ranges; there ``gpu_memory_fraction``
        caps the caching allocator instead.
    output_bytes: cap on the encoded selections written back (all records together).
    log_bytes: cap on what the worker prints (stdout + stderr); more is an ``output`` failure.
    nproc: RLIMIT_NPROC (tasks, threads included) once the worker runs as ``nobody``.
    scratch_bytes: what the candidate may write (cwd, /tmp, /dev/shm: one private tmpfs).
    isolate: set up the namespaces (``evaluator.sandbox.launcher``). False only to exercise the
        refusal and opt-out paths.
    unsafe_allow_unisolated: where the kernel allows no namespaces, run the candidate anyway
        with the weaker layers only (also: environment ``ADRS_UNSAFE_ALLOW_UNISOLATED=1``).
        Every report then says ``NOT ISOLATED``. Without it, nothing runs there.
    audit_hook: also install a ``sys.addaudithook`` guard (no subprocess, fork, socket, or
        writes outside scratch). Defence in depth only: the OS-level limits hold without it.
    """

    wall_s: float = 60.0
    startup_s: float = 60.0
    memory_mb: int = 8192
    output_bytes: int = 512 * 1024 * 1024
    log_bytes: int = 1024 * 1024
    nproc: int = 256
    gpu_memory_fraction: float | None = 0.5
    audit_hook: bool = True
    scratch_bytes: int = 64 * 1024 * 1024
    isolate: bool = True
    unsafe_allow_unisolated: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "SandboxLimits":
        return cls(**json.loads(text))
