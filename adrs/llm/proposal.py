"""One proposal: ask the model for a mutation, apply it, and run bounded repair turns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from adrs.llm.budget import Usage
from adrs.llm.client import LLMClient
from adrs.mutation import MutationResult, apply_reply, repair_message


@dataclass(frozen=True)
class Proposal:
    """What the loop gets back: the mutation (code or error) plus the conversation's cost."""

    result: MutationResult
    model: str
    usage: Usage
    turns: int
    replies: tuple[str, ...]
    # The whole conversation, replies included: the transcript kept with the candidate.
    messages: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    @property
    def code(self) -> str | None:
        return self.result.code

    @property
    def summary(self) -> str:
        return self.result.summary


async def propose(
    client: LLMClient, system: str, user: str, parent_code: str, max_repair_turns: int | None = None,
) -> Proposal:
    """Request a mutation of ``parent_code``; on an unappliable reply, send the error back.

    Raises ``BudgetExceeded`` if the budget is spent before the proposal starts; repair
    turns of a started proposal always run (they are part of the same in-flight proposal).
    All turns of one proposal use the same model, so the conversation stays coherent.
    """
    client.budget.check()
    repairs = client.config.max_repair_turns if max_repair_turns is None else max_repair_turns
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    model_index = client.choose_model()
    usage = Usage()
    replies: list[str] = []
    for turn in range(repairs + 1):
        done = await client.complete(messages, model_index=model_index)
        usage = usage + done.usage
        replies.append(done.text)
        result = apply_reply(parent_code, done.text)
        messages.append({"role": "assistant", "content": done.text})
        if result.ok or not result.repairable or turn == repairs:
            break
        messages.append({"role": "user", "content": repair_message(result)})
    return Proposal(result=result, model=done.model, usage=usage, turns=len(replies), replies=tuple(replies),
                    messages=tuple(messages))
