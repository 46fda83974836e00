"""Spending cap shared by all proposals of one run.

The cap is checked when a proposal *starts*: once spent, new proposals are refused, while
those already in flight finish and are accounted (so the cap can be overshot by at most the
in-flight calls; refusing mid-request would waste what was already paid for).
"""
from __future__ import annotations

from dataclasses import dataclass


class BudgetExceeded(RuntimeError):
    """Raised when a new proposal is requested after the budget is spent."""


@dataclass(frozen=True)
class Usage:
    """Tokens and cost of one call (or a sum of calls)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    calls: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.cost_usd + other.cost_usd,
            self.calls + other.calls,
        )


class BudgetTracker:
    """Accumulates usage and says whether another proposal may start.

    Not thread-safe by design: it lives on one asyncio event loop, where updates between
    awaits are atomic.
    """

    def __init__(self, budget_usd: float | None = None, budget_tokens: int | None = None) -> None:
        self.budget_usd = budget_usd
        self.budget_tokens = budget_tokens
        self.spent = Usage()

    @property
    def exhausted(self) -> bool:
        if self.budget_usd is not None and self.spent.cost_usd >= self.budget_usd:
            return True
        if self.budget_tokens is not None and self.spent.total_tokens >= self.budget_tokens:
            return True
        return False

    def check(self) -> None:
        """Raise BudgetExceeded if no new proposal may start."""
        if self.exhausted:
            raise BudgetExceeded(
                f"LLM budget reached: spent ${self.spent.cost_usd:.4f} and {self.spent.total_tokens} tokens "
                f"(caps: ${self.budget_usd}, {self.budget_tokens} tokens)"
            )

    def record(self, usage: Usage) -> None:
        self.spent = self.spent + usage
