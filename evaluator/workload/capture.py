"""Capture post-RoPE queries, keys, values and dense outputs through transformers' attention registry.

A capture attention function is registered with ``AttentionInterface``; it records the
tensors every layer passes to attention and then runs the stock SDPA path, so no model
code is copied and any architecture using the registry works.
"""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from rich.progress import Progress
from safetensors.torch import save_file

from evaluator.scoring import dense_attention
from evaluator.workload.cache import cache_root, locked, publish_dir
from evaluator.workload.model import load_model
from evaluator.workload.spec import WorkloadSpec
from evaluator.workload.texts import load_text, sample_windows

STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def register_attention(fn: Callable[..., Any]) -> str:
    """Register ``fn`` under a fresh name in transformers' attention and mask registries."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    name = f"adrs_{uuid.uuid4().hex[:8]}"
    AttentionInterface.register(name, fn)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    return name


def _capture_fn(store: dict[int, tuple[torch.Tensor, ...]], n_queries: int) -> Callable[..., Any]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def capture(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any, **kwargs: Any):
        scaling = kwargs.get("scaling") or module.scaling
        store[module.layer_idx] = (
            query[:, :, -n_queries:].detach(), key.detach(), value.detach(), torch.tensor(float(scaling)),
        )
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    return capture


def workload_dir(spec: WorkloadSpec) -> Path:
    return cache_root() / "workloads" / spec.content_hash()


def capture_workload(spec: WorkloadSpec, device: str | torch.device | None = None, progress: bool = True) -> Path:
    """Run the model once over each sample and write ``sample_<i>.safetensors`` files; returns the folder.

    Idempotent and safe under concurrency: a finished folder is reused, a partial one is never visible.
    """
    final = workload_dir(spec)
    if (final / "spec.json").is_file():
        return final
    with locked(final):
        if (final / "spec.json").is_file():
            return final
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        t0 = time.perf_counter()
        model, tokenizer = load_model(spec.model, device=device)
        text = load_text(spec.texts, spec.text_split)
        ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
        starts = sample_windows(len(ids), spec.n_samples, spec.context_len, spec.seed)
        store: dict[int, tuple[torch.Tensor, ...]] = {}
        model.set_attn_implementation(register_attention(_capture_fn(store, spec.n_queries)))
        tmp = final.with_name(final.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        dtype = STORAGE_DTYPES[spec.storage_dtype]
        positions = torch.arange(spec.context_len - spec.n_queries, spec.context_len)
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task(f"capturing workload {spec.name}", total=spec.n_samples)
            for i, start in enumerate(starts):
                store.clear()
                window = ids[start : start + spec.context_len][None].to(device)
                with torch.inference_mode():
                    model(input_ids=window, use_cache=False, logits_to_keep=1)
                tensors: dict[str, torch.Tensor] = {"positions": positions.clone()}
                for layer, (q, k, v, scaling) in sorted(store.items()):
                    q, k, v = (x.to(dtype).float() for x in (q, k, v))
                    out = dense_attention(q, k, v, positions.to(q.device), float(scaling))
                    tensors[f"L{layer}.q"] = q.to(dtype).cpu().contiguous()
                    tensors[f"L{layer}.k"] = k.to(dtype).cpu().contiguous()
                    tensors[f"L{layer}.v"] = v.to(dtype).cpu().contiguous()
                    tensors[f"L{layer}.out"] = out.float().cpu().contiguous()
                    tensors[f"L{layer}.scaling"] = scaling.reshape(1)
                save_file(tensors, str(tmp / f"sample_{i}.safetensors"), metadata={"start": str(start)})
                bar.advance(task)
        meta = {
            "spec": spec.model_dump(), "hash": spec.content_hash(), "num_layers": len(store),
            "starts": starts, "capture_s": round(time.perf_counter() - t0, 2), "device": str(device),
        }
        (tmp / "spec.json").write_text(json.dumps(meta, indent=2))
        publish_dir(tmp, final)
    return final
