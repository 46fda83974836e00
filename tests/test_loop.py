"""The evolution loop end to end: offline replay, an LLM on loopback, the held-out cascade."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from adrs.archive import open_run
from adrs.config import parse_config
from adrs.evaluate import CodeScorer
from adrs.loop import evolve
from adrs.spend import run_spend
from conftest import ROOT
from loopback_openai import LoopbackOpenAI, Reply


def tiny_config(**overrides):
    base = {"name": "t", "workload": "tiny", "heldout_workload": "tiny-heldout", "iterations": 6,
            "seed_candidate": str(ROOT / "seeds" / "sink_window.py"), "evaluation": {"in_process": True}}
    base.update(overrides)
    return parse_config(base)


def run(tmp: Path, cfg, workload, **kw):
    asyncio.run(evolve(tmp, cfg, CodeScorer(cfg, workload), **kw))
    with open_run(tmp) as archive:
        return [(r.iteration, r.parent_id, r.island, r.status, r.combined_score, archive.code(r.id)) for r in
                sorted(archive.all(), key=lambda r: r.iteration)]


def test_offline_run_replays_exactly(tmp_path, tiny_workload):
    cfg = tiny_config()
    first = run(tmp_path / "a", cfg, tiny_workload)
    second = run(tmp_path / "b", cfg, tiny_workload)
    assert [r[0] for r in first] == list(range(7))
    assert first == second
    assert any(r[5] != first[0][5] for r in first[1:]), "the mutator changed nothing"
    other = run(tmp_path / "c", tiny_config(seed=5), tiny_workload)
    assert other != first


def test_offline_never_evaluates_archived_code_twice(tmp_path, tiny_workload):
    rows = run(tmp_path, tiny_config(iterations=20), tiny_workload)
    evaluated = [r[5] for r in rows if r[3] != "failed"]
    assert len(evaluated) == len(set(evaluated)) >= 10  # every scored candidate is new code
    duplicates = [r for r in rows if r[3] == "failed"]
    with open_run(tmp_path) as archive:
        for r in duplicates:
            assert "duplicate" in (archive.get(r[0]).category or "") or archive.record(archive.get(r[0]).id)["category"] == "mutation"


def test_resume_continues_without_gaps(tmp_path, tiny_workload):
    cfg = tiny_config(iterations=3)
    run(tmp_path, cfg, tiny_workload)
    rows = run(tmp_path, cfg, tiny_workload, iterations=6)
    assert [r[0] for r in rows] == list(range(7))
    # The same run done in one go gives the same archive: resume loses and changes nothing.
    assert rows == run(tmp_path / "one", cfg, tiny_workload, iterations=6)


@pytest.mark.parametrize("llm", ["offline", "structural"])
def test_several_in_flight_replay_exactly_and_resume_alike(tmp_path, tiny_workload, llm):
    # Three children are scored at once (threads, so they finish in varying order); the
    # archive must not depend on that order, nor on where a resume cut the run.
    cfg = tiny_config(llm=llm, iterations=8, evaluation={"in_process": True, "in_flight": 3})
    first = run(tmp_path / "a", cfg, tiny_workload)
    assert [r[0] for r in first] == list(range(9))
    assert first == run(tmp_path / "b", cfg, tiny_workload)
    run(tmp_path / "c", cfg, tiny_workload, iterations=4)
    assert run(tmp_path / "c", cfg, tiny_workload) == first
    with open_run(tmp_path / "a") as archive:
        rows = {r.id: r for r in archive.all()}
        # Each child's parent was committed at least `in_flight` iterations before it.
        assert all(rows[r.parent_id].iteration <= max(0, r.iteration - 3) for r in rows.values() if r.parent_id)
        evaluated = [archive.code(r.id) for r in rows.values() if r.status != "failed"]
    assert len(evaluated) == len(set(evaluated)), "an in-flight sibling's code was evaluated twice"
    assert "in_flight: 3" in (tmp_path / "a" / "config.yaml").read_text()


def test_cascade_rejects_gains_that_do_not_replicate(tmp_path, tiny_workload):
    rows = run(tmp_path, tiny_config(iterations=12), tiny_workload)
    with open_run(tmp_path) as archive:
        best = archive.best()
        valid = [r for r in archive.all() if r.status == "valid"]
        assert best.combined_score == max(r.combined_score for r in valid)
        for r in archive.all():
            rec = archive.record(r.id)
            if r.status == "rejected":
                assert "held-out" in r.reject_reason and "heldout" in rec
    assert len(rows) == 13


GOOD_DIFF = """Use more sink tokens.
<<<<<<< SEARCH
SINK_TOKENS = 4
=======
SINK_TOKENS = 8
>>>>>>> REPLACE
"""
BROKEN = """<<<<<<< SEARCH
SINK_TOKENS = 4
=======
SINK_TOKENS = (
>>>>>>> REPLACE
"""


def test_llm_run_on_loopback(tmp_path, tiny_workload):
    replies = [Reply(GOOD_DIFF), Reply(status=429), Reply("I think we should try harder."),
               Reply("still no code"), Reply("none"), Reply(BROKEN), Reply(BROKEN), Reply(BROKEN)]
    with LoopbackOpenAI(replies, default=Reply(GOOD_DIFF)) as server:
        llm = {"models": [{"name": "scripted", "base_url": server.base_url, "api_key_env": None,
                           "price_input_per_m": 1.0, "price_output_per_m": 2.0}],
               "max_in_flight": 1, "backoff_initial_s": 0.01, "max_repair_turns": 2}
        cfg = tiny_config(iterations=4, llm=llm)
        rows = run(tmp_path, cfg, tiny_workload)
    assert [r[0] for r in rows] == list(range(5))
    with open_run(tmp_path) as archive:
        first = archive.record("c000001")
        assert first["llm"]["model"] == "scripted" and first["llm"]["usage"]["prompt_tokens"] > 0
        assert "SINK_TOKENS = 8" in archive.code("c000001") and "SINK_TOKENS" in first["prompt"]
        assert [m["role"] for m in first["transcript"]] == ["system", "user", "assistant"]  # the iteration's transcript
        assert first["transcript"][-1]["content"] == GOOD_DIFF
        prose = archive.record("c000002")
        assert prose["valid"] is False and prose["category"] == "mutation"
        # Repair turns are kept too: the nudges sent back and every reply.
        assert [m["role"] for m in prose["transcript"]] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
        broken = archive.record("c000003")
        assert broken["category"] in ("mutation", "syntax")
        spend = run_spend(archive)  # what `adrs leaderboard` totals: every proposal's turns, none of the agent's
        assert spend.agent.calls == 0 and spend.loop.calls == len(server.requests) - 1  # all but the 429
        assert spend.loop.prompt_tokens == sum(archive.record(r.id)["llm"]["usage"]["prompt_tokens"] for r in archive.all()[1:])
    assert len(server.requests) >= 8


FIX_WINDOW = """Use the whole budget.
<<<<<<< SEARCH
    window = (keep - sink) // 4
=======
    window = keep - sink
>>>>>>> REPLACE
"""


class _AuditWaitsForRequests(CodeScorer):
    """Holds each numerics audit until the LLM server has seen ``need`` requests (or 20 s passed)."""

    server: Any = None
    need = 3
    waited: list[bool] = []

    def audit_score(self, code: str, speedup: float | None = None):
        deadline = time.monotonic() + 20
        while len(self.server.requests) < self.need and time.monotonic() < deadline:
            time.sleep(0.05)
        self.waited.append(len(self.server.requests) >= self.need)
        return super().audit_score(code, speedup)


def test_llm_conversations_go_on_while_a_commit_is_audited(tmp_path, tiny_workload):
    # A child that beats the best is audited before it is committed. That audit (a sandboxed
    # evaluation, seconds on a busy GPU) must not stall the other proposals' conversations: here
    # the second proposal's reply lands during the audit and needs a repair turn to be sent.
    weak = tmp_path / "weak_seed.py"
    weak.write_text((ROOT / "seeds" / "sink_window.py").read_text().replace("window = keep - sink", "window = (keep - sink) // 4"))
    arrivals = []

    def script(body: dict) -> Reply:
        if len(body["messages"]) > 2:  # a repair turn
            return Reply(FIX_WINDOW)
        arrivals.append(1)
        return Reply(FIX_WINDOW) if len(arrivals) == 1 else Reply("no code this time", delay_s=3.0)

    with LoopbackOpenAI([script] * 10) as server:
        llm = {"models": [{"name": "scripted", "base_url": server.base_url, "api_key_env": None}],
               "max_in_flight": 2, "backoff_initial_s": 0.01, "max_repair_turns": 1}
        cfg = tiny_config(iterations=2, llm=llm, seed_candidate=str(weak), heldout_workload=None)
        scorer = _AuditWaitsForRequests(cfg, tiny_workload)
        scorer.server, scorer.waited = server, []
        asyncio.run(evolve(tmp_path / "run", cfg, scorer))
    assert scorer.waited and scorer.waited[0], "the repair turn was not sent while the audit ran"
    with open_run(tmp_path / "run") as archive:
        assert archive.best().iteration == 1 and "audit" in archive.record(archive.best().id)


def test_a_child_waiting_for_its_audit_holds_no_llm_slot(tmp_path, tiny_workload):
    # One proposal at a time: while the first child's audit runs, the next proposal is requested
    # already (the window bounds proposals being requested or scored, not commits).
    weak = tmp_path / "weak_seed.py"
    weak.write_text((ROOT / "seeds" / "sink_window.py").read_text().replace("window = keep - sink", "window = (keep - sink) // 4"))
    with LoopbackOpenAI([], default=Reply(FIX_WINDOW)) as server:
        llm = {"models": [{"name": "scripted", "base_url": server.base_url, "api_key_env": None}], "max_in_flight": 1}
        cfg = tiny_config(iterations=2, llm=llm, seed_candidate=str(weak), heldout_workload=None)
        scorer = _AuditWaitsForRequests(cfg, tiny_workload)
        scorer.server, scorer.need, scorer.waited = server, 2, []
        asyncio.run(evolve(tmp_path / "run", cfg, scorer))
    assert scorer.waited and scorer.waited[0], "the next proposal waited for the audit"
    assert len(server.requests) == 2


def test_llm_outage_stops_cleanly_without_committing(tmp_path, tiny_workload):
    from adrs.llm.client import LLMError

    with LoopbackOpenAI([], default=Reply(status=400)) as server:
        llm = {"models": [{"name": "down", "base_url": server.base_url, "api_key_env": None}], "max_retries": 0}
        with pytest.raises(LLMError, match="in a row"):
            run(tmp_path, tiny_config(iterations=3, llm=llm), tiny_workload)
    with open_run(tmp_path) as archive:
        assert [r.iteration for r in archive.all()] == [0]  # only the seed; failures of the LLM are not candidates
