"""Where sandboxed evaluations run: every local GPU (or CPU workers), or a Ray cluster.

The loop sees one small interface, ``Scheduler``: ``submit(code, which)`` returns a
``concurrent.futures.Future[ScoreReport]`` and ``close()`` stops the workers. Both backends
give the same guarantees: the sandbox's limits and failure categories, at most one
evaluation per GPU at a time, and no candidate lost when a worker dies mid-evaluation (it is
retried, up to ``evaluation.max_attempts``, then reported as a ``worker_lost`` failure).
"""
from __future__ import annotations

from adrs.config import RunConfig
from adrs.scheduler.base import Scheduler, SchedulerClosed, Which, WorkerLost
from adrs.scheduler.local import LocalScheduler, WorkloadSource, local_devices
from evaluator.sandbox import SandboxLimits
from evaluator.speedup import SpeedupOptions
from evaluator.workload import WorkloadSpec

__all__ = ["Scheduler", "SchedulerClosed", "Which", "WorkerLost", "LocalScheduler", "WorkloadSource",
           "local_devices", "make_scheduler", "sandbox_limits", "speedup_options", "workload_specs"]


def sandbox_limits(config: RunConfig) -> SandboxLimits:
    """The sandbox limits a run's evaluation config asks for."""
    ev = config.evaluation
    return SandboxLimits(wall_s=ev.timeout_s, memory_mb=ev.memory_mb, scratch_bytes=ev.scratch_mb << 20,
                         unsafe_allow_unisolated=ev.unsafe_allow_unisolated)


def speedup_options(config: RunConfig) -> SpeedupOptions | None:
    """What ``evaluation.speedup`` asks to time per candidate, or None when it is off."""
    ev = config.evaluation
    return SpeedupOptions(records=ev.speedup_records, queries=ev.speedup_queries) if ev.speedup else None


def make_scheduler(config: RunConfig, workloads: WorkloadSource) -> Scheduler:
    """The scheduler ``config.evaluation`` asks for.

    ``workloads`` gives the local backend's thread slots the search and held-out workloads (they
    copy them to each GPU); slot processes (``evaluation.slot_processes``, by default with more
    than one GPU) and Ray actors load the config's workload specs themselves.
    """
    ev = config.evaluation
    if ev.executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise RuntimeError("evaluation.executor 'ray' needs the ray package: pip install 'adrs[ray]' "
                               "(the same Ray version as the cluster)") from None
        from adrs.scheduler.ray_backend import RayScheduler

        return RayScheduler(workload_specs(config), config.density_target, sandbox_limits(config), address=ev.ray_address,
                            workers=ev.workers, max_attempts=ev.max_attempts, speedup=speedup_options(config),
                            spares=ev.spares)
    devices = local_devices(ev.workers)
    processes = ev.slot_processes
    if processes is None:
        processes = sum(d.startswith("cuda") for d in devices) > 1
    return LocalScheduler(workloads, config.density_target, sandbox_limits(config), devices=devices,
                          max_attempts=ev.max_attempts, speedup=speedup_options(config), spares=ev.spares,
                          specs=workload_specs(config) if processes else None)


def workload_specs(config: RunConfig) -> dict[str, WorkloadSpec | None]:
    """The specs a slot outside this process loads its workloads from (the audit's is the search's)."""
    return {"search": config.workload_spec(), "heldout": config.heldout_spec()}
