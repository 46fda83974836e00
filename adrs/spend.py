"""What a run spent on LLM calls: the population loop's proposals plus the agent's turns."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adrs.agent import transcript
from adrs.archive.store import Archive
from adrs.llm.budget import Usage


@dataclass(frozen=True)
class Spend:
    """Token and dollar totals of a run, by source."""

    loop: Usage
    agent: Usage

    @property
    def total(self) -> Usage:
        return self.loop + self.agent

    def line(self) -> str:
        """One line for the terminal."""
        t = self.total
        parts = [f"LLM spend: {t.total_tokens} tokens ({t.prompt_tokens} prompt, {t.completion_tokens} completion), "
                 f"${t.cost_usd:.4f} over {t.calls} call(s)"]
        if self.loop.calls and self.agent.calls:
            parts.append(f"loop ${self.loop.cost_usd:.4f}, agent ${self.agent.cost_usd:.4f}")
        return "; ".join(parts)


def run_spend(archive: Archive) -> Spend:
    """Totals from the candidates' records (loop proposals) and the agent transcript (agent turns).

    Agent candidates carry no usage of their own: a turn's cost is counted once, in the transcript.
    """
    loop = Usage()
    for ref in archive.all():
        if ref.llm_model is None:
            continue
        llm = archive.record(ref.id).get("llm") or {}
        usage = llm.get("usage")
        if usage:  # one proposal: its first request and any repair turns
            loop = loop + Usage(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)),
                                float(usage.get("cost_usd", 0.0)), int(llm.get("turns", 1)))
    return Spend(loop, transcript.usage_of(Path(archive.run_dir)))
