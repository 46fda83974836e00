"""Async chat-completions client for any OpenAI-compatible endpoint.

The retry policy is ours, not the SDK's (its ``max_retries`` is set to 0): exponential
backoff on 429, 5xx, timeouts and dropped connections, bounded by ``LLMConfig.max_retries``.
Model choice is a weighted draw from a seeded RNG, so a run's sequence of models replays.
"""
from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import openai

from adrs.llm.budget import BudgetTracker, Usage
from adrs.llm.config import LLMConfig, LLMModelConfig

# Plain chat messages have string content; tool-calling turns carry ``tool_calls`` lists and
# ``tool_call_id`` too, so a message is any JSON-able mapping in the chat-completions shape.
Message = Mapping[str, Any]

# Errors worth another attempt: the server was busy or flaky, the request itself was fine.
RETRYABLE = (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError, openai.APIConnectionError)
CHARS_PER_TOKEN = 4
# Other statuses that mean "try again later" (request timeout, conflict, too early).
RETRYABLE_STATUS = frozenset({408, 409, 425})


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, RETRYABLE):
        return True
    return isinstance(exc, openai.APIStatusError) and exc.status_code in RETRYABLE_STATUS


def retry_after_s(exc: BaseException) -> float | None:
    """The server's Retry-After (seconds form) if it sent one."""
    response = getattr(exc, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # HTTP-date form: fall back to our own backoff


class LLMError(RuntimeError):
    """A call failed for good (non-retryable error, or retries exhausted)."""


class MissingAPIKeyError(LLMError):
    """The environment variable named by ``api_key_env`` is not set."""


@dataclass(frozen=True)
class ToolCall:
    """One function call requested by the model; ``arguments`` is the raw JSON text it wrote."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Completion:
    """One successful chat completion with its accounting.

    ``tool_calls`` is empty unless tools were offered and the model called some;
    ``refusal`` holds a model's refusal text where the endpoint reports one separately.
    """

    text: str
    model: str
    usage: Usage
    latency_s: float
    attempts: int
    tool_calls: tuple[ToolCall, ...] = ()
    finish_reason: str | None = None
    refusal: str | None = None

    def message(self) -> dict[str, Any]:
        """The assistant message to append to the conversation (chat-completions shape)."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.text or None}
        if self.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in self.tool_calls]
        return msg


def _message_chars(m: Message) -> int:
    """Characters of a message that count towards the prompt, tool calls included."""
    calls = m.get("tool_calls") or ()
    return len(m.get("content") or "") + sum(len(str(c.get("function", {}).get("arguments", ""))) for c in calls)


def _api_key(model: LLMModelConfig, env: Mapping[str, str]) -> str:
    if model.api_key_env is None:
        return "not-needed"  # local servers (vLLM, llama.cpp) accept any key
    key = env.get(model.api_key_env)
    if not key:
        raise MissingAPIKeyError(
            f"model {model.name!r} reads its API key from ${model.api_key_env}, which is not set; "
            f"export {model.api_key_env}=... or set api_key_env: null for an endpoint without keys"
        )
    return key


def backoff_delay(attempt: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    """Delay before retry number ``attempt`` (1-based): doubling, capped, with 0-25% jitter."""
    base = min(max_s, initial_s * (2 ** (attempt - 1)))
    return base * (1.0 + 0.25 * rng.random())


class LLMClient:
    """Chat completions with weighted model choice, retries, token/cost accounting and a budget.

    ``env`` defaults to ``os.environ``; keys are read once, at construction, so a missing
    key fails before the run starts rather than at the first proposal.
    """

    def __init__(self, config: LLMConfig, seed: int = 0, env: Mapping[str, str] | None = None) -> None:
        self.config = config
        env = os.environ if env is None else env
        self._clients = {
            i: openai.AsyncOpenAI(
                api_key=_api_key(m, env), base_url=m.base_url, timeout=m.timeout_s, max_retries=0,
            )
            for i, m in enumerate(config.models)
        }
        self._rng = random.Random(f"llm-models/{seed}")
        self._jitter = random.Random(f"llm-backoff/{seed}")
        self.budget = BudgetTracker(config.budget_usd, config.budget_tokens)
        self._slots = asyncio.Semaphore(config.max_in_flight)

    def choose_model(self) -> int:
        """Index of the next model, drawn by weight from the seeded RNG."""
        weights = [m.weight for m in self.config.models]
        return self._rng.choices(range(len(weights)), weights=weights, k=1)[0]

    async def complete(self, messages: Sequence[Message], model_index: int | None = None,
                       tools: Sequence[Mapping[str, Any]] | None = None) -> Completion:
        """One chat completion, retried on transient errors; usage is charged to the budget.

        ``tools`` are function definitions in the chat-completions format; when given, the
        model may answer with tool calls (``Completion.tool_calls``) instead of, or beside, text.
        Does not check the budget (a repair turn of an in-flight proposal must finish);
        proposal-level code calls ``budget.check()`` before starting.
        """
        idx = self.choose_model() if model_index is None else model_index
        model = self.config.models[idx]
        client = self._clients[idx]
        attempts = 0
        # Backoff sleeps keep the slot on purpose: a rate-limited endpoint must not get more
        # concurrent requests while we wait.
        async with self._slots:
            while True:
                attempts += 1
                start = time.monotonic()
                try:
                    extra: dict[str, Any] = {"tools": [dict(t) for t in tools]} if tools else {}
                    resp = await client.chat.completions.create(
                        model=model.name, messages=[dict(m) for m in messages],
                        temperature=model.temperature, max_tokens=model.max_tokens, **extra,
                    )
                except openai.APIError as exc:
                    if not is_retryable(exc):
                        raise LLMError(f"{model.name}: {type(exc).__name__}: {exc}") from exc
                    if attempts > self.config.max_retries:
                        raise LLMError(
                            f"{model.name}: giving up after {attempts} attempt(s): {type(exc).__name__}: {exc}"
                        ) from exc
                    delay = backoff_delay(attempts, self.config.backoff_initial_s, self.config.backoff_max_s, self._jitter)
                    hinted = retry_after_s(exc)
                    if hinted is not None:  # honour the server, within our cap
                        delay = min(max(delay, hinted), self.config.backoff_max_s)
                    await asyncio.sleep(delay)
                    continue
                latency = time.monotonic() - start
                break
        choice = resp.choices[0] if resp.choices else None
        text = (choice.message.content or "") if choice else ""
        calls = tuple(
            ToolCall(id=c.id or f"call-{i}", name=c.function.name or "", arguments=c.function.arguments or "")
            for i, c in enumerate((choice.message.tool_calls or []) if choice else [])
            if getattr(c, "function", None) is not None
        )
        refusal = getattr(choice.message, "refusal", None) if choice else None
        u = resp.usage
        if u is not None and (u.prompt_tokens or u.completion_tokens):
            pt, ct = u.prompt_tokens or 0, u.completion_tokens or 0
        else:  # some servers omit usage; estimate (~4 chars/token) so the budget still binds
            pt = sum(_message_chars(m) for m in messages) // CHARS_PER_TOKEN + 1
            ct = (len(text) + sum(len(c.arguments) for c in calls)) // CHARS_PER_TOKEN + 1
        usage = Usage(pt, ct, model.cost(pt, ct), 1)
        self.budget.record(usage)
        return Completion(text=text, model=model.name, usage=usage, latency_s=latency, attempts=attempts,
                          tool_calls=calls, finish_reason=choice.finish_reason if choice else None, refusal=refusal)

    async def close(self) -> None:
        for c in self._clients.values():
            await c.close()
