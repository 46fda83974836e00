"""Random workloads of ``default``'s shapes, for GPU machines without the model wheel.

``synthetic_workload``: in memory (4 samples x 30 layers x 32 queries at 8192 keys, SmolLM2's
9 query and 3 KV heads, float16-exact values), the same on every run and tree.
``cached_synthetic_spec``: the same records written into the workload cache in the captured
format, under a spec of their own, so anything that loads workloads by spec (``adrs``'s Ray
actors, ``bench_scale.py``) finds them there and never runs a model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

HEADS, KV_HEADS, DIM, KEYS, QUERIES, SCALING = 9, 3, 64, 8192, 32, 0.125


def _tensors(samples: int, layers: int, device: str) -> list[list[tuple[torch.Tensor, ...]]]:
    """[sample][layer] -> (q, k, v, positions), drawn in one fixed order from one seeded generator."""
    gen = torch.Generator().manual_seed(0)
    pos = torch.arange(KEYS - QUERIES, KEYS, device=device)
    return [[(*(torch.randn(1, h, n, DIM, generator=gen).half().float().to(device)
                for h, n in ((HEADS, QUERIES), (KV_HEADS, KEYS), (KV_HEADS, KEYS))), pos)
             for _ in range(layers)] for _ in range(samples)]


def synthetic_workload(device: str, records: int | None = None) -> Any:
    """The in-memory workload; ``records``: keep only the first that many (smoke runs on a CPU)."""
    from evaluator.records import AttentionRecord
    from evaluator.scoring import dense_attention
    from evaluator.workload import Workload
    from evaluator.workload.spec import WorkloadSpec

    drawn = [(sample, layer, *t) for sample, layers in enumerate(_tensors(4, 30, device)) for layer, t in enumerate(layers)]
    kept = tuple(AttentionRecord(sample, layer, 30, q, k, v, pos, SCALING, dense_attention(q, k, v, pos, SCALING))
                 for sample, layer, q, k, v, pos in drawn[:records])
    return Workload(WorkloadSpec(name="synthetic"), "synthetic", Path("/nonexistent"), kept, 30)


def cached_synthetic_spec(samples: int = 4, layers: int = 30) -> Any:
    """A spec whose cache folder holds random records in the captured format (written once)."""
    from safetensors.torch import save_file

    from evaluator.scoring import dense_attention
    from evaluator.workload.cache import locked, publish_dir
    from evaluator.workload.capture import workload_dir
    from evaluator.workload.spec import WorkloadSpec

    # ``model`` enters the cache hash: no real capture can land in this folder, nor this one in theirs.
    spec = WorkloadSpec(name="synthetic", model=f"synthetic-random-{layers}-layers", n_samples=samples,
                        context_len=KEYS, n_queries=QUERIES)
    final = workload_dir(spec)
    with locked(final):
        if (final / "spec.json").is_file():
            return spec
        tmp = final.with_name(final.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        for sample, per_layer in enumerate(_tensors(samples, layers, "cpu")):
            tensors = {"positions": per_layer[0][3].clone()}
            for layer, (q, k, v, pos) in enumerate(per_layer):
                tensors.update({f"L{layer}.q": q.half(), f"L{layer}.k": k.half(), f"L{layer}.v": v.half(),
                                f"L{layer}.out": dense_attention(q, k, v, pos, SCALING).float().contiguous(),
                                f"L{layer}.scaling": torch.tensor([SCALING])})
            save_file(tensors, str(tmp / f"sample_{sample}.safetensors"))
        (tmp / "spec.json").write_text(json.dumps({"spec": spec.model_dump(), "hash": spec.content_hash(),
                                                   "num_layers": layers, "synthetic": True}, indent=2))
        publish_dir(tmp, final)
    return spec
