"""Settings of the LLM client: which endpoints and models, how hard to retry, how much to spend."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LLMModelConfig(BaseModel):
    """One model on one OpenAI-compatible endpoint, with its sampling weight and prices."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="model id sent to the endpoint")
    base_url: str | None = Field(default=None, description="endpoint root, e.g. http://localhost:8000/v1; None = OpenAI")
    api_key_env: str | None = Field(
        default="OPENAI_API_KEY",
        description="name of the environment variable holding the key; None for endpoints that need no key",
    )
    weight: float = Field(default=1.0, gt=0, description="relative probability of picking this model")
    temperature: float = Field(default=0.7, ge=0)
    max_tokens: int = Field(default=4096, gt=0)
    timeout_s: float = Field(default=120.0, gt=0, description="per-request timeout")
    price_input_per_m: float = Field(default=0.0, ge=0, description="USD per 1M prompt tokens")
    price_output_per_m: float = Field(default=0.0, ge=0, description="USD per 1M completion tokens")

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """USD cost of one call from the price table."""
        return (prompt_tokens * self.price_input_per_m + completion_tokens * self.price_output_per_m) / 1e6


class LLMConfig(BaseModel):
    """The client as a whole: a weighted list of models plus concurrency, retry and budget policy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: list[LLMModelConfig] = Field(min_length=1)
    max_in_flight: int = Field(default=4, gt=0, description="proposals requested concurrently")
    max_retries: int = Field(default=4, ge=0, description="retries after the first attempt on 429/5xx/timeouts")
    backoff_initial_s: float = Field(default=1.0, ge=0, description="first retry delay; doubles each retry")
    backoff_max_s: float = Field(default=60.0, ge=0)
    budget_usd: float | None = Field(default=None, ge=0, description="stop new proposals once spent; None = no cap")
    budget_tokens: int | None = Field(default=None, ge=0, description="stop new proposals once used; None = no cap")
    max_repair_turns: int = Field(default=2, ge=0, description="follow-up turns when a reply cannot be applied")

    @model_validator(mode="after")
    def _unique_names(self) -> "LLMConfig":
        keys = [(m.name, m.base_url) for m in self.models]
        if len(keys) != len(set(keys)):
            raise ValueError("each (name, base_url) may appear once in models")
        return self
