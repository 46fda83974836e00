"""What of the conversation a request carries: everything, until it outgrows the context budget.

Beyond the budget, the oldest turns after the task statement are replaced by one message that
summarises them mechanically (what each tool call did, in one line each), so the model keeps
the history of its experiments without their bulk. The summary is a pure function of the
transcript: a resumed session sends exactly what an uninterrupted one would have.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

CHARS_PER_TOKEN = 4
HEAD = 2  # the system prompt and the task statement are always sent
SUMMARY_LINE_CHARS = 160
SUMMARY_MAX_LINES = 60


def estimate_tokens(messages: Sequence[dict[str, Any]]) -> int:
    """A rough token count (4 characters a token), tool calls included."""
    chars = 0
    for m in messages:
        chars += len(m.get("content") or "")
        for call in m.get("tool_calls") or ():
            chars += len(call["function"].get("arguments") or "") + len(call["function"].get("name") or "")
    return chars // CHARS_PER_TOKEN + 4 * len(messages)


def trim(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, keeping its head and tail, with a note of the cut."""
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    tail = limit - head
    return f"{text[:head]}\n... [{len(text) - limit} characters trimmed] ...\n{text[-tail:]}"


def _groups(messages: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Messages in units that must stay together: an assistant turn with its tool results."""
    groups: list[list[dict[str, Any]]] = []
    for m in messages:
        if m.get("role") == "tool" and groups:
            groups[-1].append(m)
        else:
            groups.append([m])
    return groups


def _one_line(text: str) -> str:
    first = next((x.strip() for x in (text or "").splitlines() if x.strip()), "")
    return first[:SUMMARY_LINE_CHARS]


def summarise(dropped: Sequence[dict[str, Any]]) -> str:
    """One line per tool call (its name, arguments' gist and the first line of its result)."""
    results = {m.get("tool_call_id"): m.get("content") or "" for m in dropped if m.get("role") == "tool"}
    lines = []
    for m in dropped:
        if m.get("role") == "assistant":
            for call in m.get("tool_calls") or ():
                fn = call["function"]
                lines.append(f"- {fn.get('name')}({_args_gist(fn.get('arguments') or '')}) -> "
                             f"{_one_line(results.get(call.get('id'), '(no result)'))}")
            if not m.get("tool_calls") and m.get("content"):
                lines.append(f"- you said: {_one_line(m['content'])}")
        elif m.get("role") == "user":
            lines.append(f"- user: {_one_line(m.get('content') or '')}")
    if len(lines) > SUMMARY_MAX_LINES:
        lines = [f"- ({len(lines) - SUMMARY_MAX_LINES} older lines omitted)"] + lines[-SUMMARY_MAX_LINES:]
    return (f"[Context note: {len(dropped)} earlier messages were removed to fit the context window. "
            "Summary of what happened in them, oldest first:]\n" + "\n".join(lines) +
            "\n[Use show(), leaderboard() and diff() to look at any candidate again.]")


def _args_gist(arguments: str) -> str:
    try:
        args = json.loads(arguments)
    except json.JSONDecodeError:
        return "malformed arguments"
    if not isinstance(args, dict):
        return "malformed arguments"
    parts = []
    for key, value in args.items():
        text = str(value)
        parts.append(f"{key}=<{len(text)} chars>" if len(text) > 40 else f"{key}={text!r}")
    return ", ".join(parts)


def fit(messages: Sequence[dict[str, Any]], context_tokens: int, keep_recent: int) -> list[dict[str, Any]]:
    """The messages to send: all of them, or head + summary of the oldest turns + the newest turns."""
    messages = list(messages)
    if estimate_tokens(messages) <= context_tokens or len(messages) <= HEAD + keep_recent:
        return messages
    head, body = messages[:HEAD], messages[HEAD:]
    groups = _groups(body)
    # Drop whole groups from the front until it fits, but always keep the newest keep_recent messages.
    for cut in range(1, len(groups) + 1):
        kept = [m for g in groups[cut:] for m in g]
        if len(kept) < keep_recent and cut > 1:
            cut -= 1
            kept = [m for g in groups[cut:] for m in g]
            break
        dropped = [m for g in groups[:cut] for m in g]
        candidate = head + [{"role": "user", "content": summarise(dropped)}] + kept
        if estimate_tokens(candidate) <= context_tokens:
            return candidate
    dropped = [m for g in groups[:cut] for m in g]
    return head + [{"role": "user", "content": summarise(dropped)}] + kept
