"""The LLM client and proposals against a real HTTP server on loopback (scripted replies)."""
from __future__ import annotations

import asyncio

import pytest

from adrs.llm.budget import BudgetExceeded
from adrs.llm.client import LLMClient, LLMError, MissingAPIKeyError
from adrs.llm.config import LLMConfig, LLMModelConfig
from adrs.llm.proposal import propose
from tests.loopback_openai import LoopbackOpenAI, Reply
from tests.test_mutation import PARENT, diff

ENV = {"LOOPBACK_KEY": "sk-test"}


def config(base_url: str, **kw) -> LLMConfig:
    model_kw = {k: kw.pop(k) for k in list(kw) if k in LLMModelConfig.model_fields}
    model = LLMModelConfig(
        name="loopback-model", base_url=base_url, api_key_env="LOOPBACK_KEY", timeout_s=model_kw.pop("timeout_s", 5.0),
        price_input_per_m=1.0, price_output_per_m=2.0, **model_kw,
    )
    kw.setdefault("backoff_initial_s", 0.01)
    kw.setdefault("backoff_max_s", 0.05)
    return LLMConfig(models=[model], **kw)


def run_propose(server: LoopbackOpenAI, **kw):
    async def go():
        client = LLMClient(config(server.base_url, **kw), seed=0, env=ENV)
        try:
            return await propose(client, "system", "user", PARENT), client
        finally:
            await client.close()
    return asyncio.run(go())


def test_good_diff_proposal():
    with LoopbackOpenAI([Reply(diff("SINK_TOKENS = 4", "SINK_TOKENS = 8", "Summary: more sinks"))]) as srv:
        p, client = run_propose(srv)
    assert p.result.ok and p.turns == 1 and p.summary == "more sinks"
    assert p.usage.prompt_tokens == 100 and p.usage.completion_tokens == 50
    assert p.usage.cost_usd == pytest.approx((100 * 1.0 + 50 * 2.0) / 1e6)
    assert client.budget.spent == p.usage
    req = srv.requests[0]
    assert req["model"] == "loopback-model" and req["messages"][0]["role"] == "system"


def test_non_matching_diff_then_repair_turn():
    bad = diff("    keep = budget(inp, 0.5)", "    keep = budget(inp)")
    good = diff("SINK_TOKENS = 4", "SINK_TOKENS = 6")
    with LoopbackOpenAI([Reply(bad), Reply(good)]) as srv:
        p, _ = run_propose(srv)
    assert p.result.ok and p.turns == 2 and "SINK_TOKENS = 6" in p.code
    repair = srv.requests[1]["messages"]
    assert [m["role"] for m in repair] == ["system", "user", "assistant", "user"]
    assert "not found in the EVOLVE block" in repair[-1]["content"]
    assert p.usage.calls == 2


def test_repair_turns_are_bounded():
    bad = diff("nothing like this", "x = 1")
    with LoopbackOpenAI(default=Reply(bad)) as srv:
        p, _ = run_propose(srv, max_repair_turns=2)
    assert not p.result.ok and p.turns == 3 and len(srv.requests) == 3


def test_full_rewrite_proposal():
    block = "SINK_TOKENS = 2\n\n\ndef masker(inp):\n    return None\n"
    with LoopbackOpenAI([Reply(f"Summary: simpler\n```python\n{block}```")]) as srv:
        p, _ = run_propose(srv)
    assert p.result.ok and p.result.kind == "rewrite" and p.code.startswith('"""Seed: sinks + window."""')


def test_prose_with_no_code_then_gives_up():
    with LoopbackOpenAI(default=Reply("Let me think about attention sinks more broadly.")) as srv:
        p, _ = run_propose(srv, max_repair_turns=1)
    assert not p.result.ok and p.result.error.startswith("no code") and p.turns == 2


def test_code_outside_evolve_block_leaves_scaffolding():
    theirs = PARENT.replace("import torch\n", "import torch, os\nos.system('echo hi')\n").replace(
        "SINK_TOKENS = 4", "SINK_TOKENS = 12")
    with LoopbackOpenAI([Reply(f"```python\n{theirs}```")]) as srv:
        p, _ = run_propose(srv)
    assert p.result.ok and "os.system" not in p.code and "SINK_TOKENS = 12" in p.code


def test_429_then_success():
    good = diff("SINK_TOKENS = 4", "SINK_TOKENS = 8")
    with LoopbackOpenAI([Reply(status=429), Reply(status=500), Reply(good)]) as srv:
        p, client = run_propose(srv)
    assert p.result.ok and len(srv.requests) == 3
    assert client.budget.spent.calls == 1  # failed attempts are not billed


def test_hang_past_timeout_retries_then_fails_cleanly():
    async def go(url):
        client = LLMClient(config(url, timeout_s=0.2, max_retries=1), env=ENV)
        try:
            with pytest.raises(LLMError, match="giving up after 2 attempt"):
                await propose(client, "s", "u", PARENT)
        finally:
            await client.close()
    with LoopbackOpenAI(default=Reply("late", delay_s=1.0)) as srv:
        asyncio.run(go(srv.base_url))
        assert len(srv.requests) == 2


def test_non_retryable_error_fails_at_once():
    async def go(url):
        client = LLMClient(config(url), env=ENV)
        try:
            with pytest.raises(LLMError):
                await client.complete([{"role": "user", "content": "x"}])
        finally:
            await client.close()
    with LoopbackOpenAI([Reply(status=400), Reply("unused")]) as srv:
        asyncio.run(go(srv.base_url))
        assert len(srv.requests) == 1


def test_budget_cap_reached_mid_run():
    good = diff("SINK_TOKENS = 4", "SINK_TOKENS = 8")
    # Each call costs (1000*1 + 1000*2)/1e6 = 0.003 USD; the cap allows two sequential proposals.
    reply = Reply(good, prompt_tokens=1000, completion_tokens=1000)

    async def go(url):
        client = LLMClient(config(url, budget_usd=0.005, max_in_flight=3), env=ENV)
        try:
            done = [await propose(client, "s", "u", PARENT) for _ in range(2)]
            with pytest.raises(BudgetExceeded):
                await propose(client, "s", "u", PARENT)
            return done, client.budget
        finally:
            await client.close()
    with LoopbackOpenAI(default=reply) as srv:
        done, budget = asyncio.run(go(srv.base_url))
        assert len(srv.requests) == 2
    assert all(p.result.ok for p in done) and budget.exhausted
    assert budget.spent.cost_usd == pytest.approx(0.006)


def test_in_flight_proposals_finish_when_cap_is_hit():
    reply = Reply(diff("SINK_TOKENS = 4", "SINK_TOKENS = 8"), delay_s=0.1, prompt_tokens=10_000)

    async def go(url):
        client = LLMClient(config(url, budget_tokens=100, max_in_flight=4), env=ENV)
        try:
            started = await asyncio.gather(*(propose(client, "s", "u", PARENT) for _ in range(4)))
            with pytest.raises(BudgetExceeded):
                await propose(client, "s", "u", PARENT)
            return started
        finally:
            await client.close()
    with LoopbackOpenAI(default=reply) as srv:
        started = asyncio.run(go(srv.base_url))
    assert len(started) == 4 and all(p.result.ok for p in started)


def test_missing_api_key_env_is_a_clear_error():
    cfg = LLMConfig(models=[LLMModelConfig(name="m", base_url="http://127.0.0.1:9/v1", api_key_env="NO_SUCH_KEY_VAR")])
    with pytest.raises(MissingAPIKeyError, match="NO_SUCH_KEY_VAR"):
        LLMClient(cfg, env={})


def test_weighted_model_choice_is_seeded():
    models = [LLMModelConfig(name=n, api_key_env=None, weight=w) for n, w in (("a", 3.0), ("b", 1.0))]
    cfg = LLMConfig(models=models)
    c1, c2 = LLMClient(cfg, seed=7, env={}), LLMClient(cfg, seed=7, env={})
    seq1 = [c1.choose_model() for _ in range(200)]
    assert seq1 == [c2.choose_model() for _ in range(200)]
    assert 0.6 < seq1.count(0) / 200 < 0.9


def test_config_forbids_unknown_fields():
    with pytest.raises(Exception):
        LLMModelConfig(name="m", temprature=0.1)


def test_proposals_run_concurrently_up_to_max_in_flight():
    reply = Reply(diff("SINK_TOKENS = 4", "SINK_TOKENS = 8"), delay_s=0.15)

    async def go(url):
        client = LLMClient(config(url, max_in_flight=3), env=ENV)
        try:
            return await asyncio.gather(*(propose(client, "s", "u", PARENT) for _ in range(6)))
        finally:
            await client.close()
    with LoopbackOpenAI(default=reply) as srv:
        done = asyncio.run(go(srv.base_url))
        assert srv.peak_concurrency == 3
    assert len(done) == 6 and all(p.result.ok for p in done)


def test_retry_after_header_is_honoured_within_cap():
    import time

    good = diff("SINK_TOKENS = 4", "SINK_TOKENS = 8")
    with LoopbackOpenAI([Reply(status=429, retry_after="0.3"), Reply(good)]) as srv:
        start = time.monotonic()
        p, _ = run_propose(srv, backoff_max_s=1.0)
        assert time.monotonic() - start >= 0.3
    assert p.result.ok


def test_missing_usage_is_estimated_so_budget_binds():
    async def go(url):
        client = LLMClient(config(url), env=ENV)
        try:
            return await client.complete([{"role": "user", "content": "x" * 400}])
        finally:
            await client.close()
    with LoopbackOpenAI([Reply("y" * 80, send_usage=False)]) as srv:
        done = asyncio.run(go(srv.base_url))
    assert done.usage.prompt_tokens == 101 and done.usage.completion_tokens == 21 and done.usage.cost_usd > 0
