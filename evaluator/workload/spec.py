"""What a workload is: a model, texts and decode positions, identified by a content hash."""
from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from evaluator.workload.texts import texts_digest

# Bump when capture changes what is stored, so old caches are not reused.
CAPTURE_VERSION = 1


class WorkloadSpec(BaseModel):
    """A workload; every field but ``name`` enters the cache hash."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "custom"
    model: str = Field("embedded", description="'embedded' (SmolLM2-135M-Instruct GGUF) or a Hugging Face id / local path")
    texts: str = Field("pydoc", description="'pydoc' (Python's pydoc_data.topics) or a path to a .txt file or a folder of them")
    text_split: Literal["even", "odd", "all"] = Field(
        "even", description="which half of the text units to sample from; held-out workloads use the other half"
    )
    n_samples: int = Field(4, ge=1)
    context_len: int = Field(8192, ge=16)
    n_queries: int = Field(32, ge=1, description="decode positions per sample: the last n_queries tokens of the context")
    seed: int = 0
    storage_dtype: Literal["float16", "bfloat16", "float32"] = "float16"

    def content_hash(self) -> str:
        """Short hash of everything that determines the captured tensors."""
        payload = self.model_dump(exclude={"name"})
        payload["capture_version"] = CAPTURE_VERSION
        payload["texts_digest"] = texts_digest(self.texts)  # the texts, not just their name
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        return digest[:16]


PRESETS: dict[str, WorkloadSpec] = {
    # The search workload: 4 samples x 30 layers x 32 decode queries at 8k context.
    "default": WorkloadSpec(name="default"),
    # Other texts (the other half of the topics) and another seed: exposes overfitting.
    "heldout": WorkloadSpec(name="heldout", text_split="odd", seed=1),
    # A short context for CPU demos and quick looks.
    "small": WorkloadSpec(name="small", context_len=2048, n_queries=16),
    "small-heldout": WorkloadSpec(name="small-heldout", context_len=2048, n_queries=16, text_split="odd", seed=1),
    # Tests and CI: the real model on a short context.
    "tiny": WorkloadSpec(name="tiny", n_samples=2, context_len=256, n_queries=8),
    "tiny-heldout": WorkloadSpec(name="tiny-heldout", n_samples=2, context_len=256, n_queries=8, text_split="odd", seed=1),
}


def resolve_spec(name_or_spec: str | WorkloadSpec) -> WorkloadSpec:
    """A preset by name, or the spec itself."""
    if isinstance(name_or_spec, WorkloadSpec):
        return name_or_spec
    try:
        return PRESETS[name_or_spec]
    except KeyError:
        raise ValueError(f"unknown workload {name_or_spec!r}; presets: {', '.join(PRESETS)}") from None
