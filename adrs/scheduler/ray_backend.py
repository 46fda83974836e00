"""The Ray backend: evaluation actors on the GPU (or CPU) nodes of an existing Ray cluster.

Each actor is trusted harness code holding one GPU (``num_gpus=1``; Ray narrows
``CUDA_VISIBLE_DEVICES`` to it) or one CPU. It loads each workload once: from the node's disk
cache (``$ADRS_CACHE`` or ``~/.cache/adrs``, captured there by the first actor on the node under
the cache's file lock) into its memory, where it stays for every later candidate. The
candidate still runs in the sandbox subprocess, exactly as on the local backend, so limits,
isolation and failure categories are the same.

An actor or node that dies mid-evaluation surfaces in the driver as a Ray error; the slot
raises ``WorkerLost`` (the job is retried elsewhere, up to ``max_attempts``) and then waits
for Ray to restart its actor, or starts a new one. An actor that answers nothing within the
candidate's limits plus a margin is killed and treated the same way. Ray must already run
and ``adrs`` be installed on every node: this module connects, it never starts a cluster.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from adrs.scheduler.base import WHICH, Slot, SlotScheduler, Which, WorkerLost
from adrs.scheduler.host import GUARD_MARGIN_S, SlotHost
from evaluator.sandbox import SandboxLimits, Worker, WorkerPool, auto_spares
from evaluator.sandbox.isolation import kill_tree
from evaluator.scoring import ScoreReport
from evaluator.speedup import SpeedupOptions
from evaluator.workload import WorkloadSpec

log = logging.getLogger(__name__)


def _inflight_dir() -> Path:
    """Node-local record of the sandbox worker each actor is running (for orphan clean-up)."""
    path = Path(tempfile.gettempdir()) / f"adrs-ray-inflight-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_orphans(own_pid: int) -> int:
    """Kill sandbox workers left running by actors on this node that died (SIGKILL, OOM).

    A killed actor cannot stop its worker, and nothing else would enforce that worker's wall
    limit; the next actor to start on the node does it. Returns how many records it cleared.
    """
    cleared = 0
    for entry in _inflight_dir().glob("*.json"):
        try:
            pid = int(entry.stem)
            if pid == own_pid or _pid_alive(pid):
                continue
            data = json.loads(entry.read_text())
            kill_tree(int(data["pgid"]), str(data["marker"]))
        except (ValueError, KeyError, OSError) as exc:
            log.warning("cannot clear orphan record %s: %s", entry, exc)
        entry.unlink(missing_ok=True)
        cleared += 1
    return cleared


class _TrackedPool(WorkerPool):
    """A WorkerPool that notes, on the node, which worker is about to run a candidate."""

    def take(self) -> Worker:
        worker = super().take()
        record = _inflight_dir() / f"{os.getpid()}.json"
        record.write_text(json.dumps({"pgid": worker.pgid, "marker": worker.marker}))
        return worker


def _node_gpus() -> int:
    """GPUs on this actor's node: as many GPU actors (each with its pool) share its cores."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    gpus = [n.get("Resources", {}).get("GPU", 0) for n in ray.nodes() if n.get("NodeID") == node]
    return max(1, int(gpus[0])) if gpus else 1


class EvalActor:
    """Runs in a Ray worker process: a ``SlotHost`` on the actor's device, noting its in-flight worker."""

    def __init__(self, specs: dict[str, WorkloadSpec | None], density_target: float, limits: SandboxLimits,
                 use_gpu: bool, speedup: SpeedupOptions | None = None, spares: int | None = None) -> None:
        """``spares``: warm sandbox workers (None: ``auto_spares`` for this node, one GPU actor per GPU)."""
        sweep_orphans(os.getpid())
        self._device = "cuda:0" if use_gpu else "cpu"
        if spares is None:
            gpu_bytes = torch.cuda.get_device_properties(0).total_memory if use_gpu else None
            spares = auto_spares(use_gpu, _node_gpus() if use_gpu else 1, gpu_bytes=gpu_bytes)
        self.spares = spares
        pool = _TrackedPool(limits, cuda=use_gpu, device=self._device, spares=spares)
        self._host = SlotHost(specs, density_target, pool, speedup)

    def info(self) -> dict[str, Any]:
        """Where this actor runs (tests kill it by pid; logs name the node)."""
        import ray

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "device": self._device,
                "spares": self.spares}

    def load(self, which: str) -> str:
        """Make sure ``which`` workload is in memory; returns its label."""
        return self._host.load(which)

    def evaluate(self, code: str, which: str) -> ScoreReport:
        try:
            return self._host.evaluate(code, which)
        finally:
            (_inflight_dir() / f"{os.getpid()}.json").unlink(missing_ok=True)

    def close(self) -> None:
        self._host.close()


def _lost_errors() -> tuple[type[BaseException], ...]:
    """Ray errors meaning the actor, its worker process or its node is gone."""
    import ray.exceptions as rex

    names = ("RayActorError", "ObjectLostError", "NodeDiedError", "WorkerCrashedError", "LocalRayletDiedError")
    return tuple(getattr(rex, n) for n in names if hasattr(rex, n))


class RaySlot(Slot):
    """One actor; replaced or waited for when it dies."""

    def __init__(self, index: int, actor_cls: Any, args: tuple[Any, ...], guard_s: float, start_timeout_s: float,
                 load_timeout_s: float) -> None:
        self.name = f"ray-{index}"
        self._actor_cls = actor_cls
        self._args = args
        self._guard_s = guard_s
        self._start_timeout_s = start_timeout_s
        self._load_timeout_s = load_timeout_s
        self._actor: Any = None
        self._loaded: set[str] = set()
        self.info: dict[str, Any] = {}

    def open(self) -> None:
        import ray

        self._actor = self._actor_cls.remote(*self._args)
        self.info = ray.get(self._actor.info.remote(), timeout=self._start_timeout_s)

    def _call(self, method: str, timeout: float, *args: Any) -> Any:
        import ray
        from ray.exceptions import GetTimeoutError

        ref = getattr(self._actor, method).remote(*args)
        try:
            return ray.get(ref, timeout=timeout)
        except GetTimeoutError:
            # Hung harness code or a wedged node: kill it (Ray restarts it), count it as lost.
            ray.kill(self._actor, no_restart=False)
            raise WorkerLost(f"actor {self.info.get('pid')} gave no answer to {method} in {timeout:g} s") from None
        except _lost_errors() as exc:
            raise WorkerLost(f"actor {self.info.get('pid')} on node {self.info.get('node')}: "
                             f"{type(exc).__name__}: {str(exc)[:300]}") from exc

    def evaluate(self, code: str, which: Which) -> ScoreReport:
        if which not in self._loaded:
            self._call("load", self._load_timeout_s, which)
            self._loaded.add(which)
        return self._call("evaluate", self._guard_s, code, which)

    def recover(self) -> bool:
        """Wait for Ray's restart of the actor; if it is dead for good, start a new one."""
        import ray
        from ray.exceptions import ActorDiedError, GetTimeoutError

        self._loaded.clear()  # a restarted actor starts with empty memory
        deadline = time.monotonic() + self._start_timeout_s
        while time.monotonic() < deadline:
            try:
                self.info = ray.get(self._actor.info.remote(), timeout=max(1.0, deadline - time.monotonic()))
                return True
            except ActorDiedError:
                break
            except GetTimeoutError:
                break
            except _lost_errors():
                time.sleep(0.5)  # still restarting
        try:
            ray.kill(self._actor, no_restart=True)
            self.open()
            return True
        except (GetTimeoutError, *_lost_errors()) as exc:
            log.warning("cannot replace the evaluation actor of %s: %s", self.name, exc)
            return False

    def close(self) -> None:
        import ray

        if self._actor is not None:
            try:
                ray.get(self._actor.close.remote(), timeout=30)
            except Exception as exc:  # noqa: BLE001 - best effort: the actor is killed next anyway
                log.debug("closing actor of %s: %s", self.name, exc)
            ray.kill(self._actor, no_restart=True)
            self._actor = None


class RayScheduler(SlotScheduler):
    """Evaluation actors on an existing Ray cluster, one per GPU (or ``workers`` CPU actors)."""

    def __init__(self, specs: dict[str, WorkloadSpec | None], density_target: float, limits: SandboxLimits,
                 address: str | None = None, workers: int | None = None, max_attempts: int = 3,
                 start_timeout_s: float = 300.0, load_timeout_s: float = 3600.0,
                 speedup: SpeedupOptions | None = None, spares: int | None = None) -> None:
        import ray

        unknown = set(specs) - set(WHICH)
        if unknown:
            raise ValueError(f"unknown workload kinds {sorted(unknown)}")
        self._owns_connection = not ray.is_initialized()
        if self._owns_connection:
            # "auto" finds a cluster already running on this machine and fails if there is none.
            ray.init(address=address or "auto", namespace="adrs", log_to_driver=False)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        use_gpu = gpus > 0
        count = min(workers or gpus, gpus) if use_gpu else (workers or 1)
        actor_cls = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=1, max_restarts=-1, max_task_retries=0,
                               scheduling_strategy="SPREAD")(EvalActor)
        guard = limits.startup_s + limits.wall_s + GUARD_MARGIN_S
        args = (specs, density_target, limits, use_gpu, speedup, spares)
        self.use_gpu = use_gpu
        self._ray_slots = [RaySlot(i, actor_cls, args, guard, start_timeout_s, load_timeout_s) for i in range(count)]
        super().__init__(self._ray_slots, max_attempts)
        # Fail at start, not by recording every candidate of the run as worker_lost.
        if not self.wait_started(start_timeout_s + 5):
            self.close()
            raise RuntimeError(f"no evaluation actor could start on the Ray cluster at {address or 'auto'} "
                               f"(is adrs installed on its nodes, and are {count} {'GPU' if use_gpu else 'CPU'}s free?)")

    def worker_info(self) -> list[dict[str, Any]]:
        """pid, node and device of each slot's current actor (empty for one not started yet)."""
        return [dict(s.info) for s in self._ray_slots]

    def close(self) -> None:
        import ray

        super().close()
        if self._owns_connection and ray.is_initialized():
            ray.shutdown()
