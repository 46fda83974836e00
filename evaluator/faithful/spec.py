"""What a faithful-scoring run is: needle prompts, their length, and how many sparse decode steps.

Kept apart from ``evaluator.workload.spec`` on purpose: adding fields there would change
every captured workload's content hash and invalidate caches.
"""
from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from evaluator.workload.texts import texts_digest

# Bump when prompt construction or decoding changes what a spec means.
FAITHFUL_VERSION = 1
# The embedded model's context window; prompt plus generated tokens must fit under it.
MAX_POSITIONS = 8192


class FaithfulSpec(BaseModel):
    """A faithful-scoring setup; every field but ``name`` enters ``content_hash``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "custom"
    model: str = Field("embedded", description="'embedded' (SmolLM2-135M-Instruct GGUF) or a Hugging Face id / local path")
    texts: str = Field("pydoc", description="haystack prose: 'pydoc' or a path to a .txt file or a folder of them")
    text_split: Literal["even", "odd", "all"] = "even"
    n_samples: int = Field(8, ge=1, description="needle prompts, decoded together as one batch")
    prompt_tokens: int = Field(8160, ge=64, description="tokens of every prompt (haystack + needle + question)")
    decode_steps: int = Field(20, ge=1, description="single-token sparse forward passes after the question")
    seed: int = 0

    def content_hash(self) -> str:
        """Short hash of everything that determines prompts and decoding."""
        payload = self.model_dump(exclude={"name"})
        payload["faithful_version"] = FAITHFUL_VERSION
        payload["texts_digest"] = texts_digest(self.texts)  # the texts, not just their name
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        return f"{self.name}@{self.content_hash()}"

    def check_fits(self, max_positions: int = MAX_POSITIONS) -> None:
        """Raise ValueError if the prompt plus generated tokens exceed the model's window."""
        last = self.prompt_tokens + self.decode_steps
        if last > max_positions:
            raise ValueError(f"prompt_tokens + decode_steps = {last} exceeds the model's {max_positions} positions")


FAITHFUL_PRESETS: dict[str, FaithfulSpec] = {
    # Checkpoints and verification: 8 needle prompts near 8k tokens, 20 sparse decode steps.
    "faithful": FaithfulSpec(name="faithful"),
    "faithful-heldout": FaithfulSpec(name="faithful-heldout", text_split="odd", seed=1),
    # CPU demos.
    "faithful-small": FaithfulSpec(name="faithful-small", n_samples=4, prompt_tokens=2048),
    # Tests: enough steps (7 generated tokens) for a space plus a 5-digit pass key.
    "faithful-tiny": FaithfulSpec(name="faithful-tiny", n_samples=2, prompt_tokens=256, decode_steps=6),
}


def resolve_faithful_spec(name_or_spec: str | FaithfulSpec) -> FaithfulSpec:
    """A preset by name, or the spec itself."""
    if isinstance(name_or_spec, FaithfulSpec):
        return name_or_spec
    try:
        return FAITHFUL_PRESETS[name_or_spec]
    except KeyError:
        raise ValueError(f"unknown faithful spec {name_or_spec!r}; presets: {', '.join(FAITHFUL_PRESETS)}") from None


# The fast-score preset each faithful preset pairs with (same texts and seed split).
FAST_TO_FAITHFUL = {"default": "faithful", "heldout": "faithful-heldout", "small": "faithful-small",
                    "small-heldout": "faithful-heldout", "tiny": "faithful-tiny", "tiny-heldout": "faithful-tiny"}


def faithful_preset_for(name: str) -> str:
    """A faithful preset name given either a faithful preset or the fast-score preset it pairs with."""
    if name in FAITHFUL_PRESETS:
        return name
    if name in FAST_TO_FAITHFUL:
        return FAST_TO_FAITHFUL[name]
    raise ValueError(f"no faithful preset for {name!r}; presets: {', '.join(FAITHFUL_PRESETS)}")
