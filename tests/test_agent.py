"""Agent mode against a scripted loopback server speaking the chat-completions tool-calling format.

The `openai` client, the archive (git + SQLite), the scorer and the embedded model are real; only
the model's replies are scripted.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

from adrs import review
from adrs.agent import context, transcript
from adrs.agent.session import run_agent
from adrs.archive import open_run
from adrs.evaluate import CodeScorer
from loopback_openai import LoopbackOpenAI, Reply, tool_reply
from test_loop import tiny_config

HALVE = """<<<<<<< SEARCH
    keep = budget(inp)  # [q] tokens per query
=======
    keep = budget(inp, 0.5 * inp.density_target)
>>>>>>> REPLACE"""
TOPK = '''from evaluator.contract import attention_logits, top_per_query


def masker(inp: MaskerInput) -> Selection:
    """Top density_target of causal keys by exact logit."""
    return top_per_query(attention_logits(inp), budget(inp)).float()
'''
SINKS = """<<<<<<< SEARCH
SINK_TOKENS = 4
=======
SINK_TOKENS = {n}
>>>>>>> REPLACE"""


def agent_config(server: LoopbackOpenAI, **overrides):
    llm = {"models": [{"name": "scripted-agent", "base_url": server.base_url, "api_key_env": None,
                       "price_input_per_m": 1.0, "price_output_per_m": 2.0}],
           "backoff_initial_s": 0.01, "backoff_max_s": 0.05, **overrides.pop("llm", {})}
    return tiny_config(llm=llm, **overrides)


def run(tmp: Path, cfg, workload, **kw):
    return asyncio.run(run_agent(tmp, cfg, CodeScorer(cfg, workload), **kw))


def tool_results(request: dict) -> list[str]:
    return [m["content"] for m in request["messages"] if m["role"] == "tool"]


def test_session_scores_reads_layers_reverts_and_improves(tmp_path, tiny_workload):
    script = [
        tool_reply(("leaderboard", {"top": 3}), ("show", {"candidate": "current"})),
        tool_reply(("score", {"code": HALVE, "summary": "halve the budget"})),
        tool_reply(("show", {"candidate": "c000001"})),
        tool_reply(("revert", {"candidate": "c000000"})),
        tool_reply(("score", {"code": f"```python\n{TOPK}```", "summary": "oracle top-k"})),
        tool_reply(("diff", {"a": "c000000", "b": "c000002"})),
        Reply("Exact top-k beats the window at the same density. DONE"),
    ]
    with LoopbackOpenAI(script) as server:
        out = run(tmp_path, agent_config(server), tiny_workload)
    assert out.ok and "finished" in out.reason and out.turns == 7
    reqs = server.requests
    assert len(reqs) == 7 and all(r["tools"] and {t["function"]["name"] for t in r["tools"]} >= {
        "score", "faithful_score", "show", "diff", "leaderboard", "notes", "revert"} for r in reqs)
    # Each request carries the whole conversation so far, with tool results answering their call ids.
    last = reqs[-1]["messages"]
    calls = [c["id"] for m in last if m["role"] == "assistant" for c in m.get("tool_calls") or []]
    assert calls == [m["tool_call_id"] for m in last if m["role"] == "tool"] and len(calls) == 7
    scored = tool_results(reqs[2])[-1]
    assert scored.startswith("c000001 (child of c000000) committed") and "| layer | error | density |" in scored
    assert "worst record" in tool_results(reqs[3])[-1]  # show() of the worse candidate, per-layer errors
    assert "Current candidate is now c000000" in tool_results(reqs[4])[-1]
    assert "NEW BEST" in tool_results(reqs[5])[-1]
    assert "attention_logits" in tool_results(reqs[6])[-1]  # the diff
    with open_run(tmp_path) as archive:
        worse, better = archive.get("c000001"), archive.get("c000002")
        seed = archive.get("c000000")
        assert worse.parent_id == better.parent_id == "c000000"  # revert: the improvement edits the seed
        assert worse.author == better.author == "model" and worse.llm_model == "scripted-agent"
        assert worse.combined_score < seed.combined_score < better.combined_score
        assert archive.best().id == "c000002"
        record = archive.record("c000002")
        assert record["llm"]["mode"] == "agent" and record["llm"]["turn"] == 5
        assert "oracle top-k" in record["response"] and record["transcript"][-1]["role"] == "assistant"
        assert "Current candidate is now c000000" in record["prompt"]  # the revert result preceded the edit
    state = transcript.state_of(transcript.load(transcript.transcript_path(tmp_path)))
    assert state.turns == 7 and state.usage.prompt_tokens == 700 and state.current == "c000002"


def test_malformed_calls_unknown_tools_refusals_and_rate_limits(tmp_path, tiny_workload):
    script = [
        tool_reply(("score", '{"code": "SINK_TOKENS = 8"')),  # truncated JSON
        tool_reply(("run_shell", {"cmd": "ls"})),
        tool_reply(("leaderboard", {"top": "many"}), ("show", {"candidate": "c999999"})),
        tool_reply(("score", {"code": "x" * 50_000})),
        tool_reply(("score", {"code": SINKS.replace("SINK_TOKENS = 4", "SINK_TOKENS = 5").format(n=9)})),
        tool_reply(("score", {"code": "print('hi')", "verbose": True})),
        Reply(status=429),
        Reply(refusal="I can't help with that."),
        Reply("Let me think about it."),
        tool_reply(("score", {"code": SINKS.format(n=8)})),
        Reply("DONE"),
    ]
    with LoopbackOpenAI(script) as server:
        out = run(tmp_path, agent_config(server), tiny_workload)
    assert out.ok and "finished" in out.reason, out.reason
    results = [m["content"] for m in server.requests[-1]["messages"] if m["role"] == "tool"]
    assert "not valid JSON" in results[0]
    assert "unknown tool 'run_shell'" in results[1]
    assert "invalid arguments for leaderboard" in results[2] and "no candidate 'c999999'" in results[3]
    assert "over the limit" in results[4]
    assert "could not be applied" in results[5] and "not found in the EVOLVE block" in results[5]
    assert "verbose" in results[6] and "invalid arguments" in results[6]
    assert all(r.startswith("error:") for r in results[:7]) and results[7].startswith("c000001")
    users = [m["content"] for m in server.requests[-1]["messages"] if m["role"] == "user"]
    assert any("refusal" in u for u in users) and any("Continue by calling tools" in u for u in users)
    assert len(server.requests) == 11  # the 429 was retried by the client, unseen by the conversation
    with open_run(tmp_path) as archive:
        assert [r.id for r in archive.all()] == ["c000000", "c000001"]  # errors commit nothing


def test_budget_stop_then_resume_continues_the_conversation(tmp_path, tiny_workload):
    script = [tool_reply(("score", {"code": SINKS.format(n=n), "parent": "0"})) for n in (6, 8, 12, 16)] + [Reply("DONE")]
    with LoopbackOpenAI(script) as server:
        cfg = agent_config(server)
        first = run(tmp_path, cfg, tiny_workload, turns=2)
        assert first.ok and "turn budget" in first.reason and first.turns == 2
        seen_before = server.requests[-1]["messages"]
        second = run(tmp_path, cfg, tiny_workload, turns=10)
    assert "finished" in second.reason and second.turns == 5
    resumed = server.requests[2]["messages"]
    assert resumed[:len(seen_before)] == seen_before  # the same conversation, continued
    assert resumed[len(seen_before)]["role"] == "assistant"  # then the reply of turn 2 and its result
    assert second.usage.calls == 5 and second.usage.prompt_tokens == 500  # spend accumulates over sessions
    with open_run(tmp_path) as archive:
        assert [r.parent_id for r in archive.all()] == [None] + ["c000000"] * 4


def test_dollar_and_wall_budgets_and_outage_stop_with_a_resume_hint(tmp_path, tiny_workload):
    with LoopbackOpenAI([tool_reply(("notes", {}), delay_s=1.0)], default=Reply("DONE")) as server:
        slow = run(tmp_path / "wall", agent_config(server, agent={"max_wall_s": 0.5}), tiny_workload)
    assert slow.ok and "wall-time budget reached" in slow.reason and slow.turns == 1
    with LoopbackOpenAI([tool_reply(("leaderboard", {}))], default=Reply(status=400)) as server:
        # 100 prompt tokens at $1/M + 50 at $2/M = $0.0002 per turn: one turn spends the cap.
        out = run(tmp_path / "usd", agent_config(server, llm={"budget_usd": 0.0002}), tiny_workload)
        assert out.ok and "LLM budget reached" in out.reason and out.turns == 1
        down = run(tmp_path / "down", agent_config(server, llm={"max_retries": 0}), tiny_workload)
    assert not down.ok and "LLM call failed" in down.reason and down.turns == 0
    assert "adrs resume" in down.resume_hint(tmp_path / "down")
    entries = transcript.load(transcript.transcript_path(tmp_path / "down"))
    assert entries[-1]["what"] == "stop" and entries[-1]["ok"] is False


def _approver(run_dir: Path, stop: threading.Event) -> None:
    """A reviewer approving each pending checkpoint (the second one with a note)."""
    while not stop.is_set():
        if (run_dir / "repo").is_dir():
            with open_run(run_dir) as archive:
                for c in review.pending(archive):
                    review.decide(archive, c, "approve", "good, keep going" if c.iteration == 2 else "")
        time.sleep(0.2)


def test_review_note_and_pause_reach_the_agent(tmp_path, tiny_workload):
    def note_then_reply(body):
        with open_run(tmp_path) as archive:  # a reviewer's note, mid-session, from another handle
            review.decide(archive, review.resolve(archive, "1"), "note", "try exact top-k instead of sinks")
        return tool_reply(("score", {"code": SINKS.format(n=12), "parent": "c000000"}))

    stop = threading.Event()
    reviewer = threading.Thread(target=_approver, args=(tmp_path, stop))
    script = [tool_reply(("score", {"code": SINKS.format(n=8)})), note_then_reply, Reply("DONE")]
    with LoopbackOpenAI(script) as server:
        cfg = agent_config(server, review={"every": 1, "mode": "pause"})
        reviewer.start()
        try:
            out = run(tmp_path, cfg, tiny_workload)
        finally:
            stop.set()
            reviewer.join()
    assert out.ok and "finished" in out.reason
    entries = transcript.load(transcript.transcript_path(tmp_path))
    assert [e["what"] for e in entries if e.get("what") in ("paused", "resumed")] == ["paused", "resumed"] * 2
    third = server.requests[2]["messages"]
    steer = [m["content"] for m in third if m["role"] == "user" and "human reviewer" in m["content"]]
    assert any("try exact top-k instead of sinks" in s for s in steer)
    assert any("approved checkpoint checkpoint/000002" in s and "good, keep going" in s for s in steer)
    # Each review tag is delivered once: the note is not repeated.
    assert sum("try exact top-k" in s for s in steer) == 1


def test_faithful_score_tool_keeps_a_rescore_note(tmp_path, tiny_workload):
    script = [tool_reply(("faithful_score", {"candidate": "best"})), Reply("DONE")]
    with LoopbackOpenAI(script) as server:
        out = run(tmp_path, agent_config(server), tiny_workload)
    assert out.ok
    result = tool_results(server.requests[1])[0]
    assert result.startswith("faithful score of c000000 on faithful-tiny") and "needle_accuracy" in result
    with open_run(tmp_path) as archive:
        note = archive.rescores("c000000")[-1]
    assert note["why"] == "faithful" and note["report"]["valid"] and note["report"]["spec"].startswith("faithful-tiny")


def test_context_fits_by_summarising_old_turns():
    messages = [{"role": "system", "content": "s" * 400}, {"role": "user", "content": "task"}]
    for i in range(30):
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": f"c{i}", "type": "function", "function": {"name": "score", "arguments": json.dumps({"code": "x" * 800})}}]})
        messages.append({"role": "tool", "tool_call_id": f"c{i}", "content": f"c{i:06d}: valid\n" + "y" * 2000})
    sent = context.fit(messages, context_tokens=4000, keep_recent=6)
    assert context.estimate_tokens(sent) <= 4000 < context.estimate_tokens(messages)
    assert sent[:2] == messages[:2] and sent[-6:] == messages[-6:]
    assert "earlier messages were removed" in sent[2]["content"] and "score(code=<" in sent[2]["content"]
    assert "c000000: valid" in sent[2]["content"]  # each dropped call keeps its one-line outcome
    assert sent[3]["role"] == "assistant"  # never a tool result without its call
    assert context.fit(messages[:6], 4000, 6) == messages[:6]


def test_cli_agent_killed_mid_turn_resumes_with_transcript_intact(tmp_path, tiny_workload):
    import os
    import signal
    import subprocess
    import sys

    import yaml

    from conftest import ROOT
    from test_cli import ENV, adrs

    score = lambda n: tool_reply(("score", {"code": SINKS.format(n=n), "parent": "0", "summary": f"{n} sinks"}))  # noqa: E731
    script = [score(8), Reply(delay_s=120), score(12), Reply("Twelve sinks it is. DONE")]
    run_dir = tmp_path / "run"
    with LoopbackOpenAI(script) as server:
        cfg = {"name": "agent", "workload": "tiny", "heldout_workload": "tiny-heldout",
               "seed_candidate": str(ROOT / "seeds" / "sink_window.py"),
               "llm": {"models": [{"name": "scripted-agent", "base_url": server.base_url, "api_key_env": None,
                                   "price_input_per_m": 1.0, "price_output_per_m": 2.0}]},
               "agent": {"max_turns": 2}}
        (tmp_path / "agent.yaml").write_text(yaml.safe_dump(cfg))
        proc = subprocess.Popen([sys.executable, "-m", "adrs.cli", "agent", str(tmp_path / "agent.yaml"), "--run-dir",
                                 str(run_dir), "--turns", "5"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while len(server.requests) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert len(server.requests) == 2, proc.stdout.read().decode() if proc.poll() is not None else "timed out"
        os.kill(proc.pid, signal.SIGKILL)  # mid-turn: the second request is in flight
        proc.wait()
        resumed = adrs("resume", str(run_dir), "--turns", "5")
    assert "agent stopped after 3 turn(s): the model finished" in resumed.stdout
    assert server.requests[2]["messages"] == server.requests[1]["messages"]  # the same conversation, continued
    shown = adrs("show", str(run_dir), "c000002", "--prompt").stdout
    assert "[tool call score" in shown and "=======\nSINK_TOKENS = 12\n>>>>>>> REPLACE" in shown and "agent turn 2" in shown
    board = adrs("leaderboard", str(run_dir)).stdout
    assert "LLM spend: 450 tokens" in board and "$0.0006" in board  # three turns of 100 + 50 tokens
    assert adrs("show", str(run_dir), "0", "--prompt", check=False).returncode == 2  # the seed had no prompt
