"""The ``agent:`` section of a run config: turn and wall-time budgets, context and output limits.

Token and dollar budgets are the LLM config's (``llm.budget_tokens``, ``llm.budget_usd``): one
accounting for the loop and the agent.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class AgentConfig(BaseModel):
    """How one agent session runs; used by ``adrs agent``, ignored by ``adrs run``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_turns: int = Field(40, ge=0, description="model requests in the whole conversation (resume included)")
    max_wall_s: float | None = Field(None, gt=0, description="wall time of one `adrs agent`/`adrs resume` invocation; null = no cap")
    context_tokens: int = Field(
        24000, gt=0, description="estimated tokens (4 chars each) a request may carry; older turns are summarised beyond it",
    )
    keep_recent_messages: int = Field(8, ge=2, description="newest messages always sent verbatim (never summarised)")
    max_tool_output_chars: int = Field(6000, gt=200, description="a tool result longer than this is trimmed")
    max_code_chars: int = Field(20000, gt=0, description="code passed to score/faithful_score longer than this is refused")
    max_nudges: int = Field(2, ge=0, description="replies in a row without tool calls that get a nudge before the session ends")
    faithful_workload: str | None = Field(
        None, description="faithful preset for faithful_score; null = the one matching the run's workload",
    )
