"""LLM side of the loop: config models, an async OpenAI-compatible client, budget, proposals."""
from adrs.llm.budget import BudgetExceeded, BudgetTracker, Usage
from adrs.llm.client import Completion, LLMClient, LLMError, MissingAPIKeyError, ToolCall
from adrs.llm.config import LLMConfig, LLMModelConfig
from adrs.llm.proposal import Proposal, propose

__all__ = [
    "BudgetExceeded", "BudgetTracker", "Usage", "Completion", "LLMClient", "LLMError",
    "MissingAPIKeyError", "ToolCall", "LLMConfig", "LLMModelConfig", "Proposal", "propose",
]
