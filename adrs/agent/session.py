"""One agent session: the turn loop between the model, its tools and the human reviewer.

Each turn: check the budgets (turns, tokens, dollars, wall time), wait while a checkpoint in
``pause`` mode is pending, deliver new review notes, send the conversation (fitted to the
context budget), then run the tool calls of the reply. Everything is written to the
transcript before it is acted on, so a session killed at any point resumes where it was;
a tool call that was running when it died is answered with an "interrupted" result.
"""
from __future__ import annotations

import asyncio
import re
import string
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from adrs.agent import context, steering, transcript
from adrs.agent.tools import TOOL_SCHEMAS, Workbench
from adrs.archive import open_run
from adrs.archive.store import Archive
from adrs.config import RunConfig, dump_config
from adrs.evaluate import CodeScorer
from adrs.llm.budget import Usage
from adrs.llm.client import Completion, LLMClient, LLMError
from adrs.commit import ensure_seed
from adrs.prompts import DEFAULT_TEMPLATE_DIR, format_score, render_prompt
from evaluator.candidate import split_candidate

Event = dict[str, Any]
AGENT_TEMPLATE = "agent.md"
REVIEW_POLL_S = 1.0
DONE_WORD = "DONE"


@dataclass(frozen=True)
class AgentOutcome:
    """How a session ended."""

    reason: str
    turns: int
    usage: Usage
    best: str | None
    current: str
    ok: bool  # False when it stopped on an error (an outage), not a budget or the model finishing

    def resume_hint(self, run_dir: Path) -> str:
        return f"continue with: adrs resume {run_dir}" + ("" if self.ok else " (once the endpoint works again)")


def opening_messages(archive: Archive, cfg: RunConfig, max_turns: int) -> list[dict[str, str]]:
    """The system prompt (the loop's, for the task and contract) and the agent's task statement."""
    seed = archive.get(0)
    code, record = archive.code(seed.id), archive.record(seed.id)
    system = render_prompt(code, record, parent_id=seed.id, density_target=cfg.density_target, objective=cfg.objective,
                           speedup_target=cfg.speedup_target).system
    template = string.Template((DEFAULT_TEMPLATE_DIR / AGENT_TEMPLATE).read_text())
    task = template.substitute(max_turns=max_turns, seed_id=seed.id, seed_block=split_candidate(code).block.strip("\n"),
                               seed_score=format_score(record))
    return [{"role": "system", "content": system}, {"role": "user", "content": task}]


class _Session:
    """The mutable parts of one running session, and the transcript writes that change them."""

    def __init__(self, run_dir: Path, cfg: RunConfig, archive: Archive, bench: Workbench,
                 state: transcript.State, entries: list[dict[str, Any]], emit: Callable[[Event], None]) -> None:
        self.run_dir, self.cfg, self.archive, self.bench, self.emit = run_dir, cfg, archive, bench, emit
        self.path = transcript.transcript_path(run_dir)
        self.messages = list(state.messages)
        self.turn = state.turns
        self.delivered = set(state.delivered)
        self.nudges = state.nudges
        # Messages new since the last request: with the reply, they are what produced a candidate.
        self.fresh = transcript.turn_entries(entries, self.turn + 1)

    def add(self, message: dict[str, Any], **meta: Any) -> None:
        entry: dict[str, Any] = {"kind": "message", "turn": self.turn + 1, "message": message}
        if meta:
            entry["meta"] = meta
        transcript.append(self.path, entry)
        self.messages.append(message)
        self.fresh.append(message)

    def event(self, what: str, **data: Any) -> None:
        transcript.append(self.path, {"kind": "event", "what": what, **data})

    def close_dangling_calls(self) -> None:
        """Answer tool calls a killed session left without results (the API requires an answer for each)."""
        answered = {m.get("tool_call_id") for m in self.messages if m.get("role") == "tool"}
        last = next((m for m in reversed(self.messages) if m.get("role") == "assistant"), None)
        for call in (last or {}).get("tool_calls") or ():
            if call["id"] not in answered:
                self.add({"role": "tool", "tool_call_id": call["id"], "content": (
                    "error: interrupted: the session stopped while this call ran. If it was a score, the "
                    "candidate may have been committed: check leaderboard().")}, current=self.bench.current)

    def budget_stop(self, max_turns: int, client: LLMClient, started: float) -> str | None:
        if self.turn >= max_turns:
            return f"turn budget reached ({self.turn}/{max_turns} turns)"
        if client.budget.exhausted:
            spent = client.budget.spent
            return f"LLM budget reached (${spent.cost_usd:.4f}, {spent.total_tokens} tokens)"
        wall = self.cfg.agent.max_wall_s
        if wall is not None and time.monotonic() - started >= wall:
            return f"wall-time budget reached ({wall:g} s)"
        return None

    async def wait_for_review(self) -> None:
        checkpoint = steering.paused_at(self.archive, self.cfg.review.mode)
        if checkpoint is None:
            return
        self.event("paused", checkpoint=checkpoint.name)
        self.emit({"kind": "paused", "message": (
            f"paused at {checkpoint.name} ({checkpoint.reason}). Decide with `adrs review {self.run_dir} approve` "
            f"(or `reject REASON`); the agent continues then. Or Ctrl-C now and `adrs resume {self.run_dir}` later.")})
        while steering.paused_at(self.archive, self.cfg.review.mode) is not None:
            await asyncio.sleep(REVIEW_POLL_S)
        self.event("resumed")
        self.emit({"kind": "resumed", "message": "review decided; continuing"})

    def deliver_steering(self) -> None:
        steer = steering.pending_steering(self.archive, frozenset(self.delivered))
        if steer is None:
            return
        self.add({"role": "user", "content": steer.text}, steering=list(steer.tags), current=self.bench.current)
        self.delivered.update(steer.tags)
        self.emit({"kind": "steering", "message": f"delivered {len(steer.tags)} review note(s) to the agent"})

    def record_reply(self, done: Completion) -> dict[str, Any]:
        self.turn += 1
        transcript.append(self.path, {"kind": "usage", "turn": self.turn, "model": done.model,
                                      "prompt_tokens": done.usage.prompt_tokens,
                                      "completion_tokens": done.usage.completion_tokens, "cost_usd": done.usage.cost_usd,
                                      "latency_s": done.latency_s, "attempts": done.attempts,
                                      "finish_reason": done.finish_reason})
        reply = done.message()
        produced = self.fresh + [reply]
        entry = {"kind": "message", "turn": self.turn, "message": reply}
        transcript.append(self.path, entry)
        self.messages.append(reply)
        self.fresh = []
        return {"prompt": transcript.conversation_text(produced[:-1]), "response": transcript.conversation_text([reply]),
                "transcript": produced,
                "llm": {"turn": self.turn}}

    def nudge_for(self, done: Completion) -> str | None:
        """The reminder after a reply without tool calls, or None when the model said it is done."""
        if done.refusal:
            return (f"Your reply was a refusal ({done.refusal.strip()[:200]}). This is a benign research task on "
                    "attention sparsity; continue with the tools.")
        if done.finish_reason == "length":
            return "Your reply was cut off (output token limit). Send smaller edits: SEARCH/REPLACE blocks in score()."
        if re.search(rf"\b{DONE_WORD}\b", done.text or ""):
            return None
        return f"Continue by calling tools (score, show, leaderboard, ...). When you have finished, reply {DONE_WORD}."


async def run_agent(run_dir: Path, cfg: RunConfig, scorer: CodeScorer, turns: int | None = None,
                    on_event: Callable[[Event], None] | None = None, base: Path = Path(".")) -> AgentOutcome:
    """Start or continue the agent conversation of ``run_dir`` until a budget ends, the model finishes, or an outage.

    ``turns`` overrides ``agent.max_turns`` (the total over the whole conversation, resumes included).
    """
    if cfg.llm == "offline":
        raise ValueError("agent mode needs an LLM endpoint: set `llm:` in the config (it cannot be 'offline')")
    emit = on_event or (lambda e: None)
    max_turns = cfg.agent.max_turns if turns is None else turns
    path = transcript.transcript_path(run_dir)
    with open_run(run_dir, create=True) as archive:
        if not archive.config_path.exists():
            archive.config_path.write_text(dump_config(cfg))
        path.parent.mkdir(parents=True, exist_ok=True)  # marks the run as an agent run for `adrs resume`
        ensure_seed(archive, cfg, scorer, base)
        entries = transcript.load(path)
        state = transcript.state_of(entries)
        client = LLMClient(cfg.llm, seed=cfg.seed)
        client.budget.record(state.usage)  # what earlier sessions spent counts against the caps
        start_at = state.current or archive.get(0).id
        bench = Workbench(archive, scorer, cfg, current=start_at, max_output_chars=cfg.agent.max_tool_output_chars)
        s = _Session(run_dir, cfg, archive, bench, state, entries, emit)
        s.event("start", turns=s.turn, max_turns=max_turns)
        if not s.messages:
            for message in opening_messages(archive, cfg, max_turns):
                s.add(message, current=bench.current)
        s.close_dangling_calls()
        started = time.monotonic()

        def finish(reason: str, ok: bool = True) -> AgentOutcome:
            s.event("stop", reason=reason, ok=ok)
            best = archive.best()
            return AgentOutcome(reason, s.turn, client.budget.spent, best.id if best else None, bench.current, ok)

        try:
            while True:
                reason = s.budget_stop(max_turns, client, started)
                if reason:
                    return finish(reason)
                await s.wait_for_review()
                s.deliver_steering()
                request = context.fit(s.messages, cfg.agent.context_tokens, cfg.agent.keep_recent_messages)
                try:
                    done = await client.complete(request, tools=TOOL_SCHEMAS)
                except LLMError as exc:
                    # Retries (rate limits, timeouts, 5xx) are the client's; what reaches here is an outage.
                    return finish(f"LLM call failed: {exc}", ok=False)
                bench.model = done.model
                bench.provenance = s.record_reply(done)
                emit({"kind": "turn", "turn": s.turn, "message": _turn_line(s.turn, done)})
                if done.tool_calls:
                    s.nudges = 0
                    for call in done.tool_calls:
                        out = await bench.call(call)
                        s.add({"role": "tool", "tool_call_id": call.id, "content": out.text}, current=bench.current,
                              tool=call.name, ok=out.ok, candidate=out.candidate)
                        emit({"kind": "tool", "message": f"  {call.name}: {out.text.splitlines()[0][:150]}",
                              "candidate": out.candidate})
                    continue
                nudge = s.nudge_for(done)
                if nudge is None:
                    return finish("the model finished (replied DONE)")
                if s.nudges >= cfg.agent.max_nudges:
                    return finish(f"the model replied {s.nudges + 1} times in a row without calling a tool")
                s.nudges += 1
                s.add({"role": "user", "content": nudge}, nudge=True, current=bench.current)
        finally:
            await client.close()


def _turn_line(turn: int, done: Completion) -> str:
    calls = ", ".join(c.name for c in done.tool_calls) or "no tool calls"
    text = (done.text or done.refusal or "").strip().splitlines()
    return f"turn {turn}: {calls}" + (f" - {text[0][:100]}" if text else "")
