"""The agent's conversation on disk: every request's new messages, every reply, every tool result.

``RUN/agent/transcript.jsonl`` is append-only, one JSON object per line, flushed and fsynced
before the session acts on it, so a session killed at any point resumes from the last whole
line (a torn last line is ignored). The full conversation is kept here; what is *sent* each
turn is derived from it by :mod:`adrs.agent.context`, so trimming never loses anything.

Entry kinds:
* ``message``: one chat message (``message``) with ``turn`` and optional ``meta``
  (``current``: the candidate being edited after a tool ran; ``steering``: review tags delivered;
  ``nudge``: a reminder sent after a reply without tool calls);
* ``usage``: the accounting of one model request (one turn);
* ``event``: ``start``, ``stop`` (with ``reason``), ``paused``, ``resumed``.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adrs.llm.budget import Usage
from adrs.safetext import terminal_safe

AGENT_DIR = "agent"
TRANSCRIPT_FILE = "transcript.jsonl"


def transcript_path(run_dir: Path) -> Path:
    """Where a run's agent transcript lives (its presence marks an agent run)."""
    return Path(run_dir) / AGENT_DIR / TRANSCRIPT_FILE


def is_agent_run(run_dir: Path) -> bool:
    """True when ``run_dir`` was started by ``adrs agent``."""
    return (Path(run_dir) / AGENT_DIR).is_dir()


def append(path: Path, entry: dict[str, Any]) -> None:
    """Append one entry durably (the line is on disk when this returns)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": time.time(), **entry}, default=str)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def load(path: Path) -> list[dict[str, Any]]:
    """Every whole entry, oldest first; a torn final line (a kill mid-write) is dropped and truncated away."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    entries: list[dict[str, Any]] = []
    good = 0
    for line in raw.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good += len(line)
    if good < len(raw):  # later appends must not glue onto the torn line
        with open(path, "r+b") as f:
            f.truncate(good)
    return entries


@dataclass(frozen=True)
class State:
    """What a session needs from its transcript to continue."""

    messages: tuple[dict[str, Any], ...] = ()
    turns: int = 0
    usage: Usage = Usage()
    current: str | None = None
    delivered: frozenset[str] = frozenset()
    nudges: int = 0  # nudges sent since the last tool call
    stops: tuple[str, ...] = field(default_factory=tuple)


def state_of(entries: list[dict[str, Any]]) -> State:
    """Fold the entries into the conversation and counters a resumed session starts from."""
    messages: list[dict[str, Any]] = []
    turns, usage, current, nudges = 0, Usage(), None, 0
    delivered: set[str] = set()
    stops: list[str] = []
    for e in entries:
        kind = e.get("kind")
        if kind == "message":
            messages.append(e["message"])
            meta = e.get("meta") or {}
            current = meta.get("current", current)
            delivered.update(meta.get("steering", ()))
            if meta.get("nudge"):
                nudges += 1
            elif e["message"].get("role") == "tool":
                nudges = 0
        elif kind == "usage":
            turns += 1
            usage = usage + Usage(e["prompt_tokens"], e["completion_tokens"], e["cost_usd"], 1)
        elif kind == "event" and e.get("what") == "stop":
            stops.append(str(e.get("reason", "")))
    return State(tuple(messages), turns, usage, current, frozenset(delivered), nudges, tuple(stops))


def usage_of(run_dir: Path) -> Usage:
    """Tokens and dollars the agent of ``run_dir`` spent (zero for a loop run)."""
    return state_of(load(transcript_path(run_dir))).usage


def turn_entries(entries: list[dict[str, Any]], turn: int) -> list[dict[str, Any]]:
    """The messages of one turn: what was new in its request, then the reply and its tool results."""
    return [e["message"] for e in entries if e.get("kind") == "message" and e.get("turn") == turn]


def conversation_text(messages: list[dict[str, Any]]) -> str:
    """Messages as plain text, one ``[role]`` header each, tool calls spelled out."""
    parts = []
    for m in messages:
        body = m.get("content") or ""
        for call in m.get("tool_calls") or ():
            body += f"\n[tool call {call['function']['name']} id={call.get('id')}]\n{_arguments_text(call['function']['arguments'])}"
        head = f"[{m.get('role')}]" + (f" (result of {m['tool_call_id']})" if m.get("tool_call_id") else "")
        parts.append(f"{head}\n{body.strip()}")
    return "\n\n".join(parts)


def _arguments_text(arguments: str) -> str:
    """Tool-call arguments for a reader: one ``key:`` per argument, code unescaped; raw text if not a JSON object."""
    try:
        args = json.loads(arguments)
    except json.JSONDecodeError:
        return arguments
    if not isinstance(args, dict):
        return arguments
    return "\n".join(f"{k}:\n{v}" if isinstance(v, str) and "\n" in v else f"{k}: {v}" for k, v in args.items())


def prompt_text(record: dict[str, Any]) -> str | None:
    """The prompt and reply that produced a candidate, from its record (None for seeds, humans, offline).

    Control characters are replaced, so the text is safe to print to a terminal.
    """
    text = _prompt_text(record)
    return None if text is None else terminal_safe(text, markup=False)


def _prompt_text(record: dict[str, Any]) -> str | None:
    if record.get("transcript"):
        text = conversation_text(record["transcript"])
        llm = record.get("llm") or {}
        if llm.get("mode") == "agent":
            text = (f"(agent turn {llm.get('turn')}: the messages new in that request and the reply; the whole "
                    f"conversation is in {AGENT_DIR}/{TRANSCRIPT_FILE})\n\n") + text
        return text
    if record.get("prompt") is not None:
        return f"[prompt]\n{record['prompt']}\n\n[reply]\n{record.get('response') or ''}"
    return None
