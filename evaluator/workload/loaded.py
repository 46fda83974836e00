"""A captured workload loaded as float32 records (imports torch: kept out of the package's
``__init__``, so that reading a preset's spec stays cheap)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from evaluator import scoring
from evaluator.records import AttentionRecord
from evaluator.workload.capture import capture_workload
from evaluator.workload.spec import WorkloadSpec, resolve_spec


@dataclass(frozen=True)
class Workload:
    """A captured workload: its spec, content hash, folder and float32 records (sample-major)."""

    spec: WorkloadSpec
    hash: str
    path: Path
    records: tuple[AttentionRecord, ...]
    num_layers: int
    precision: str = "float32"  # what the trusted scorer computes in ("float64": the numerics audit)

    @property
    def label(self) -> str:
        suffix = "" if self.precision == "float32" else f"/{self.precision}"
        return f"{self.spec.name}@{self.hash}{suffix}"


def at_precision(workload: Workload, dtype: torch.dtype) -> Workload:
    """``workload`` scored in ``dtype``: same masker inputs, dense references and sparse outputs in ``dtype``."""
    records = tuple(scoring.at_precision(r, dtype) for r in workload.records)
    return dataclasses.replace(workload, records=records, precision=str(dtype).removeprefix("torch."))


def load_workload(
    name_or_spec: str | WorkloadSpec, device: str | torch.device = "cpu", progress: bool = True,
) -> Workload:
    """Load a workload, capturing it first if it is not cached (a second load does not run the model)."""
    spec = resolve_spec(name_or_spec)
    path = capture_workload(spec, progress=progress)
    meta = json.loads((path / "spec.json").read_text())
    num_layers = int(meta["num_layers"])
    records = []
    for sample in range(spec.n_samples):
        t = load_file(str(path / f"sample_{sample}.safetensors"), device=str(device))
        positions = t["positions"]
        for layer in range(num_layers):
            records.append(AttentionRecord(
                sample=sample, layer=layer, num_layers=num_layers,
                queries=t[f"L{layer}.q"].float(), keys=t[f"L{layer}.k"].float(), values=t[f"L{layer}.v"].float(),
                positions=positions, scaling=float(t[f"L{layer}.scaling"][0]), dense_out=t[f"L{layer}.out"],
            ))
    return Workload(spec=spec, hash=spec.content_hash(), path=path, records=tuple(records), num_layers=num_layers)
