"""Needle prompts of an exact token length, so every sample decodes at the same positions.

Built from ``evaluator.workload.texts.needle_tasks``: each prompt is cut into haystack-before,
needle sentence, haystack-after and question; the haystack sides are trimmed (at the token
level) so that the needle keeps its depth and the whole prompt has ``prompt_tokens`` tokens.
Equal lengths let all samples share one batch and one ``query_positions`` per masker call.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from evaluator.faithful.spec import FaithfulSpec
from evaluator.workload.texts import load_text, needle_tasks

QUESTION_MARK = "\n\nQuestion:"
# Generous haystack so trimming, not the text, sets the length (prose runs ~4 chars a token).
CHARS_PER_TOKEN_BUDGET = 6


@dataclass(frozen=True)
class NeedlePrompts:
    """Token ids ``[n, prompt_tokens]`` plus, per sample, the answer and the question length."""

    ids: torch.Tensor
    answers: tuple[str, ...]
    question_tokens: tuple[int, ...]

    @property
    def sparse_tokens(self) -> int:
        """Trailing prompt tokens decoded sparse: the longest question (the same for every sample)."""
        return max(self.question_tokens)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_prompts(spec: FaithfulSpec, tokenizer: Any) -> NeedlePrompts:
    """The spec's needle prompts, each exactly ``spec.prompt_tokens`` tokens long."""
    text = load_text(spec.texts, spec.text_split)
    tasks = needle_tasks(text, spec.n_samples, spec.prompt_tokens * CHARS_PER_TOKEN_BUDGET, spec.seed)
    rows, answers, questions = [], [], []
    for task in tasks:
        needle = f" The pass key for {task.key} is {task.answer}. Remember it: the pass key for {task.key} is {task.answer}. "
        n0 = task.prompt.index(needle)
        q0 = task.prompt.rindex(QUESTION_MARK)
        before = _encode(tokenizer, task.prompt[:n0])
        middle = _encode(tokenizer, needle)
        after = _encode(tokenizer, task.prompt[n0 + len(needle):q0])
        question = _encode(tokenizer, task.prompt[q0:])
        hay = spec.prompt_tokens - len(middle) - len(question)
        if hay < 0 or len(before) + len(after) < hay:
            raise ValueError(f"cannot build a {spec.prompt_tokens}-token needle prompt from {spec.texts!r}")
        # Keep the needle's relative depth; borrow from the other side when one side is short.
        n_before = min(len(before), max(hay - len(after), round(task.depth * hay)))
        n_after = hay - n_before
        row = (before[len(before) - n_before:] if n_before else []) + middle + after[:n_after] + question
        rows.append(row)
        answers.append(task.answer)
        questions.append(len(question))
    return NeedlePrompts(torch.tensor(rows, dtype=torch.long), tuple(answers), tuple(questions))


def first_number(text: str) -> str | None:
    """The first run of digits in ``text`` (the model's answer to 'the pass key is'), if any."""
    match = re.search(r"\d+", text)
    return match.group(0) if match else None
