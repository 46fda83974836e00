"""The local backend: one sandboxed evaluation at a time per visible GPU, or CPU workers."""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

from adrs.scheduler.base import Slot, SlotScheduler, Which
from adrs.scheduler.host import lost_if_unstarted, sandboxed_report
from adrs.scheduler.process import ProcessSlot
from evaluator.sandbox import SandboxLimits, WorkerPool, auto_spares
from evaluator.scoring import ScoreReport
from evaluator.speedup import SpeedupOptions
from evaluator.workload import Workload, WorkloadSpec

WorkloadSource = Callable[[Which], Workload]


def local_devices(workers: int | None = None) -> list[str]:
    """One slot per visible CUDA device (at most ``workers``), else ``workers`` (default 1) CPU slots.

    More slots than GPUs would put two evaluations on one GPU, so their timings and memory
    caps would interfere: the GPU count is a ceiling.
    """
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_gpu:
        return [f"cuda:{i}" for i in range(min(workers or n_gpu, n_gpu))]
    return ["cpu"] * (workers or 1)


def local_spares(devices: Sequence[str]) -> int:
    """``evaluation.spares: null`` for slots on ``devices`` of this host (see ``auto_spares``)."""
    gpus = [d for d in devices if d.startswith("cuda")]
    if not gpus:
        return auto_spares(False, len(devices))
    return auto_spares(True, len(devices), gpu_bytes=min(torch.cuda.get_device_properties(d).total_memory for d in gpus))


def on_device(workload: Workload, device: str) -> Workload:
    """``workload`` with every record on ``device`` (the workload itself when already there)."""
    if workload.records[0].queries.device == torch.device(device):
        return workload
    return dataclasses.replace(workload, records=tuple(r.to(device) for r in workload.records))


class LocalSlot(Slot):
    """A device with its own warm sandbox pool; workloads are copied onto the device once."""

    def __init__(self, index: int, device: str, workloads: WorkloadSource, density_target: float,
                 limits: SandboxLimits, speedup: SpeedupOptions | None = None, spares: int = 1) -> None:
        self.name = f"local-{index}-{device}"
        self.spares = spares
        self._speedup = speedup
        self.device = device
        self._source = workloads
        self._density_target = density_target
        self._limits = limits
        self._workloads: dict[Which, Workload] = {}
        self._pool: WorkerPool | None = None

    def open(self) -> None:
        # Created in the serving thread, which also takes every worker from it.
        self._pool = WorkerPool(self._limits, cuda=self.device.startswith("cuda"), device=self.device, spares=self.spares)

    def workload(self, which: Which) -> Workload:
        if which not in self._workloads:
            self._workloads[which] = on_device(self._source(which), self.device)
        return self._workloads[which]

    def evaluate(self, code: str, which: Which) -> ScoreReport:
        return lost_if_unstarted(sandboxed_report(code, self.workload(which), self._density_target, self._pool,
                                                  self._speedup if which == "search" else None))

    def recover(self) -> bool:
        return True  # every evaluation gets a fresh worker from the pool anyway

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None


class LocalScheduler(SlotScheduler):
    """Evaluations spread over local devices, one at a time on each."""

    def __init__(self, workloads: WorkloadSource, density_target: float, limits: SandboxLimits,
                 devices: Sequence[str] | None = None, max_attempts: int = 3, speedup: SpeedupOptions | None = None,
                 spares: int | None = None, specs: dict[str, WorkloadSpec | None] | None = None) -> None:
        """``spares``: warm sandbox workers per slot (None: ``auto_spares`` for these devices).

        ``specs``: serve each device from a harness process of its own (``ProcessSlot``), which loads
        the workloads from these specs; None: serve them from threads of this process, with ``workloads``.
        """
        self.devices = list(devices) if devices is not None else local_devices()
        self.spares = spares if spares is not None else local_spares(self.devices)
        self.processes = specs is not None
        if specs is not None:
            slots: list[Slot] = [ProcessSlot(i, d, specs, density_target, limits, speedup, self.spares)
                                 for i, d in enumerate(self.devices)]
        else:
            slots = [LocalSlot(i, d, workloads, density_target, limits, speedup, self.spares)
                     for i, d in enumerate(self.devices)]
        super().__init__(slots, max_attempts)
