"""Texts for workloads: Python's own pydoc topics (no network) or local files; needle prompts."""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path


def text_units(source: str) -> list[str]:
    """The text units of a source, in a fixed order.

    'pydoc' gives the topics of ``pydoc_data.topics`` sorted by name (about 113k tokens);
    a file gives its paragraphs; a folder gives its ``.txt`` files sorted by name.
    """
    if source == "pydoc":
        from pydoc_data.topics import topics

        return [topics[k] for k in sorted(topics)]
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"no .txt files in {path}")
        return [f.read_text(encoding="utf-8", errors="replace") for f in files]
    if path.is_file():
        return [p for p in path.read_text(encoding="utf-8", errors="replace").split("\n\n") if p.strip()]
    raise FileNotFoundError(f"text source {source!r} is neither 'pydoc' nor an existing file or folder")


def texts_digest(source: str) -> str:
    """Hash of a source's text units, for workload identities.

    'pydoc' is the running Python's own documentation, which changes between Python versions
    (3.11 and 3.12 give different windows and numbers for the same spec), so the name alone
    does not identify the texts. A source that does not exist hashes as such; capturing it
    then fails with the real error.
    """
    try:
        units = text_units(source)
    except FileNotFoundError:
        return f"missing:{source}"
    digest = hashlib.sha256()
    for unit in units:
        digest.update(unit.encode("utf-8", errors="replace") + b"\0")
    return digest.hexdigest()[:16]


def load_text(source: str, split: str = "all") -> str:
    """Concatenate the units of ``source``; 'even'/'odd' keep every other unit (search vs held-out)."""
    units = text_units(source)
    if split == "even":
        units = units[0::2]
    elif split == "odd":
        units = units[1::2]
    elif split != "all":
        raise ValueError(f"unknown text split {split!r}")
    return "\n\n".join(u.strip() for u in units)


def sample_windows(n_tokens: int, n_samples: int, length: int, seed: int) -> list[int]:
    """Start offsets of ``n_samples`` token windows of ``length``, spread over the text.

    The text is cut into equal strata and one window is drawn in each, so samples do not
    overlap when the text is long enough.
    """
    if n_tokens < length:
        raise ValueError(f"text has {n_tokens} tokens, fewer than the context length {length}")
    rng = random.Random(seed)
    span = n_tokens - length
    if span == 0:
        return [0] * n_samples
    stratum = span / n_samples
    return [int(i * stratum + rng.random() * stratum) for i in range(n_samples)]


WORDS = ("amber", "falcon", "quartz", "meadow", "cobalt", "harbor", "lantern", "willow", "ember", "glacier",
         "saffron", "orchid", "granite", "comet", "velvet", "canyon")


@dataclass(frozen=True)
class NeedleTask:
    """A long prompt with one key/number sentence hidden at ``depth`` (0..1), and its answer."""

    prompt: str
    answer: str
    key: str
    depth: float


def needle_tasks(text: str, n: int, approx_chars: int, seed: int) -> list[NeedleTask]:
    """Needle-retrieval prompts built from prose: a pass-key sentence at a random depth, then a question.

    ``approx_chars`` sizes the haystack (about 4 characters a token for English prose).
    """
    rng = random.Random(seed)
    tasks = []
    for _ in range(n):
        start = rng.randrange(0, max(1, len(text) - approx_chars))
        hay = text[start : start + approx_chars]
        key = rng.choice(WORDS)
        number = str(rng.randrange(10000, 99999))
        depth = rng.uniform(0.05, 0.95)
        cut = hay.rfind(". ", 0, int(depth * len(hay))) + 2 if ". " in hay[: int(depth * len(hay))] else int(depth * len(hay))
        needle = f" The pass key for {key} is {number}. Remember it: the pass key for {key} is {number}. "
        prompt = (
            hay[:cut] + needle + hay[cut:]
            + f"\n\nQuestion: what is the pass key for {key}?\nAnswer: the pass key for {key} is"
        )
        tasks.append(NeedleTask(prompt=prompt, answer=number, key=key, depth=cut / max(1, len(hay))))
    return tasks
