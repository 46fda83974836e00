"""Faithful scoring on the real embedded model (the 'faithful-tiny' spec), in process and sandboxed."""
from __future__ import annotations

import os
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluator.faithful import FaithfulContext, FaithfulReport, faithful_score
from evaluator.faithful.prompts import first_number
from evaluator.sandbox import SandboxLimits
from evaluator.sandbox.devicepack import decode_dense_on_device, encode_selection_on_device, packbits, unpackbits
from evaluator.sandbox.transport import encode_selection
from evaluator.sandbox.isolation import live_descendants

ROOT = Path(__file__).resolve().parents[1]
SELECT_ALL = ROOT / "tests" / "candidates" / "select_all.py"
SINK_WINDOW = ROOT / "seeds" / "sink_window.py"
ORACLE = ROOT / "seeds" / "oracle_topk.py"
PER_KV_HEAD = ROOT / "tests" / "candidates" / "per_kv_head.py"

# A valid sink + window masker that misbehaves on its second call of layer 4 (the first decode step).
HOSTILE = '''
import os, sys, time
import torch
from evaluator.contract import MaskerInput, budget, causal_mask

# EVOLVE-BLOCK-START
def masker(inp: MaskerInput):
    inp.state["n"] = inp.state.get("n", 0) + 1
    if inp.layer_idx == 4 and inp.state["n"] == 2:
{attack}
    keep = budget(inp)
    k = torch.arange(inp.num_keys, device=inp.keys.device)[None, :]
    pos = inp.query_positions.to(inp.keys.device)[:, None]
    sel = ((k < 4) | (k > pos - keep[:, None])) & causal_mask(inp)
    b, h = inp.queries.shape[:2]
    return sel.float().expand(b, h, -1, -1).contiguous()
# EVOLVE-BLOCK-END
'''

ATTACKS = {
    "hang": ("while True:\n    pass", "timeout"),
    "nan": ("b, h = inp.queries.shape[:2]\nreturn torch.full((b, h, inp.queries.shape[2], inp.num_keys), float('nan'))", "invalid"),
    "not_a_tensor": ("return 'all of them'", "invalid"),
    "exit": ("os._exit(0)", "crash"),
    "raises": ("raise RuntimeError('boom')", "exception"),
    "prints": ("sys.stdout.write('x' * (4 << 20)); sys.stdout.flush()", "output"),
    # Raw bytes on the reply channel, then a normal return: the parent must reject the frame.
    # The session's pipes arrive as fds: write to every pipe past stdio (the reply pipe among them).
    "channel_garbage": (
        "for fd in os.listdir('/proc/self/fd'):\n"
        "    try:\n"
        "        if int(fd) > 2 and os.readlink(f'/proc/self/fd/{fd}').startswith('pipe:'):\n"
        "            os.write(int(fd), b'\\xff' * 64)\n"
        "    except OSError:\n"
        "        pass", "crash"),
}


@pytest.fixture(scope="module")
def ctx():
    """Model, prompts, dense prefill and dense reference of 'faithful-tiny', shared by the tests."""
    context = FaithfulContext("faithful-tiny", "cpu")
    yield context
    context.close()


def _numbers(r: FaithfulReport) -> dict:
    d = r.to_dict()
    d.pop("wall_s")
    d.pop("candidate_s")
    d.pop("isolation")  # sandboxed: the namespaces; in process: none
    return d


def _assert_no_worker_left(ctx: FaithfulContext) -> None:
    assert ctx.last_worker is not None
    pgid, marker = ctx.last_worker
    assert live_descendants(pgid, marker) == []


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001])
def test_device_packbits_match_numpy(n):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.3
    assert torch.equal(packbits(mask), torch.from_numpy(np.packbits(mask.numpy())))
    assert torch.equal(unpackbits(packbits(mask), n), mask)


def test_device_encoding_equals_transport_encoding():
    shape = (2, 3, 4, 16)
    w = (torch.rand(shape, generator=torch.Generator().manual_seed(0)) < 0.4).float()
    w[0, 0, 0, :3] = torch.tensor([2.5, float("nan"), 7.0])
    ours, meta = encode_selection_on_device(w, shape, "cpu")
    theirs, meta2 = encode_selection(w, shape, "cpu")
    assert meta == meta2 and ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ("nz", "ne1")) and torch.allclose(ours["vals"], theirs["vals"], equal_nan=True)
    back = decode_dense_on_device(ours, shape, torch.device("cpu"))
    assert torch.equal(back.isnan(), w.isnan()) and torch.equal(back.nan_to_num(), w.nan_to_num())


def test_prompts_have_exact_length_and_answers(ctx):
    prompts = ctx.prompts
    assert tuple(prompts.ids.shape) == (2, 256)
    for row, answer in zip(prompts.ids, prompts.answers):
        assert f"pass key for" in ctx.tokenizer.decode(row[:-prompts.sparse_tokens].tolist())
        assert answer in ctx.tokenizer.decode(row.tolist())
    assert first_number(" the key is 12345.") == "12345" and first_number("none") is None


def test_select_all_reproduces_dense_decoding(ctx):
    r = ctx.score(SELECT_ALL, 0.10)
    assert r.valid, r.reason
    assert r.error == 0.0 and r.density == pytest.approx(1.0) and r.kv_density == pytest.approx(1.0)
    assert r.agreement == 1.0 and r.kl == pytest.approx(0.0, abs=1e-12)
    assert r.needle_accuracy == r.dense_needle_accuracy
    assert r.n_calls == 30 * (1 + 6)
    _assert_no_worker_left(ctx)


def test_sink_window_sandboxed_equals_in_process(ctx):
    sandboxed = ctx.score(SINK_WINDOW, 0.10)
    in_process = ctx.score(SINK_WINDOW, 0.10, in_process=True)
    assert sandboxed.valid and in_process.valid, (sandboxed.reason, in_process.reason)
    assert sandboxed.density <= 0.10 and sandboxed.error > 0.0 and sandboxed.kl > 0.0
    assert sandboxed.density_penalty == 0.0
    # sink_window selects the same keys for every head: a GQA group reads each of them once.
    assert sandboxed.kv_density == pytest.approx(sandboxed.density) and sandboxed.kv_density < 0.5
    assert all(layer.kv_density == pytest.approx(layer.density) for layer in sandboxed.per_layer)
    assert _numbers(sandboxed) == _numbers(in_process)
    assert len(sandboxed.per_layer) == 30


def test_a_warm_spare_serves_the_prefix_from_its_preload(ctx):
    """A pool's spare loads the session's prefix keys before its job; the session then fills its key
    cache from them, not from the file: proven by spoiling the file once the spare has loaded it
    (oracle top-k reads the keys; sink_window would not notice)."""
    from evaluator.sandbox import WorkerPool

    in_process = ctx.score(ORACLE, 0.10, in_process=True)
    try:
        with WorkerPool(SandboxLimits(), cuda=False, device="cpu") as pool:
            assert _numbers(ctx.score(ORACLE, 0.10, pool=pool)) == _numbers(in_process)
            assert pool.wait_ready(60)
            (spare,) = pool.waiting
            prefix = ctx.prefix_file()
            assert spare.preloaded == prefix
            size = prefix.stat().st_size
            with open(prefix, "r+b") as fh:  # every key becomes NaN (0xFFFF in bf16 / float32 halves)
                head = 8 + int.from_bytes(fh.read(8), "little")
                fh.seek(head)
                fh.write(b"\xff" * (size - head))
            preloaded = ctx.score(ORACLE, 0.10, pool=pool)
        from_file = ctx.score(ORACLE, 0.10)  # a fresh worker reads the spoiled file
    finally:
        ctx.close()  # the next test gets a fresh prefix file
    assert _numbers(preloaded) == _numbers(in_process)
    assert _numbers(from_file) != _numbers(in_process)


def test_polling_sessions_score_as_sleeping_ones(ctx, monkeypatch):
    """Where cores are plentiful both sides poll before sleeping; force it on this box too."""
    from evaluator.sandbox.session import SPIN_ENV, session_spin_s

    monkeypatch.setenv(SPIN_ENV, "2")
    assert session_spin_s() == 0.002
    assert _numbers(ctx.score(SINK_WINDOW, 0.10)) == _numbers(ctx.score(SINK_WINDOW, 0.10, in_process=True))


def test_spin_until_readable_returns_on_data_or_after_its_time():
    from evaluator.sandbox.channel import spin_until_readable

    r, w = os.pipe()
    try:
        t0 = time.perf_counter()
        assert not spin_until_readable(r, 0.05)  # nothing comes: gives up after its time, not before
        assert 0.05 <= time.perf_counter() - t0 < 5
        timer = threading.Timer(0.05, os.write, (w, b"x"))
        timer.start()
        assert spin_until_readable(r, 10.0)  # returns once the byte lands, long before 10 s
        assert time.perf_counter() - t0 < 5
        timer.join()
    finally:
        os.close(r)
        os.close(w)


def test_a_session_closing_after_its_pool_starts_no_spare():
    from evaluator.faithful.decode import CallInputs
    from evaluator.faithful.score import session_selector
    from evaluator.sandbox import WorkerPool
    from evaluator.sandbox.session import SandboxSession

    pool = WorkerPool(SandboxLimits(), cuda=False)
    q, keys, pos = torch.randn(1, 3, 1, 8), torch.randn(1, 1, 16, 8), torch.tensor([15])
    session = SandboxSession(SINK_WINDOW, "cpu", 0.5, 0, {"row_groups": 1, "max_len": 16}, pool=pool)
    try:
        session.start()
        assert pool.waiting == ()  # the replacement waits for the session's end
        weights = session_selector(session)(CallInputs(0, 1, 0, q, keys, keys[:, :, 15:], 15, pos, 0.35))
        assert int(weights.ne(0).sum()) == 3 * 8
    finally:
        pool.close()
        session.close()
    assert pool.waiting == ()




def test_per_kv_head_session_equals_in_process(ctx, tmp_path):
    """A dense per-KV-head selection crosses the session's reply pipe per KV head; the parent
    repeats it for each query head: the same numbers as in process, kv_density below density."""
    path = PER_KV_HEAD
    sandboxed = ctx.score(path, 0.10)
    in_process = ctx.score(path, 0.10, in_process=True)
    assert sandboxed.valid and in_process.valid, (sandboxed.reason, in_process.reason)
    assert _numbers(sandboxed) == _numbers(in_process)
    assert sandboxed.kv_density <= sandboxed.density


def test_faithful_score_function_with_context(ctx):
    r = faithful_score(SINK_WINDOW, "faithful-tiny", 0.10, in_process=True, context=ctx)
    assert r.valid and r.spec == ctx.spec.label
    again = FaithfulReport.from_dict(r.to_dict())
    assert again.per_layer == r.per_layer
    with pytest.raises(ValueError):
        faithful_score(SINK_WINDOW, "faithful-small", 0.10, context=ctx)


def _hostile_score(context: FaithfulContext, tmp_path: Path, attack: str) -> tuple[FaithfulReport, str]:
    """The sandboxed score of HOSTILE with ``attack``, and the category it must fail with."""
    code, category = ATTACKS[attack]
    path = tmp_path / f"{attack}.py"
    path.write_text(HOSTILE.replace("{attack}", textwrap.indent(code, " " * 8)))
    return context.score(path, 0.10, limits=SandboxLimits(wall_s=8.0)), category


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_hostile_mid_session_is_contained(ctx, tmp_path, attack):
    r, category = _hostile_score(ctx, tmp_path, attack)
    assert not r.valid and r.category == category, (r.category, r.reason)
    # Generous: the bound is the candidate's 8 s plus the trusted decode on a shared 2-core box.
    assert r.wall_s < 120
    _assert_no_worker_left(ctx)


def test_syntax_error_fails_before_any_worker(ctx, tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("def masker(inp:\n")
    r = ctx.score(path, 0.10)
    assert not r.valid and r.category == "syntax"


def test_run_scorer_keeps_each_presets_context_and_a_warm_worker(tiny_workload):
    """``CodeScorer.faithful`` (the agent's faithful_score tool) builds a preset's context once and
    takes its sandbox workers from a warm pool; a reused context scores exactly as a fresh one."""
    from adrs.config import parse_config
    from adrs.evaluate import CodeScorer

    cfg = parse_config({"name": "faithful", "workload": "tiny", "heldout_workload": None, "iterations": 1,
                        "seed_candidate": str(SINK_WINDOW)})
    scorer = CodeScorer(cfg, tiny_workload)
    code = Path(SINK_WINDOW).read_text()
    try:
        first = scorer.faithful(code, "faithful-tiny")
        faithful = scorer._faithful
        ctx, pool = faithful._contexts["faithful-tiny"], faithful._pool
        assert pool is not None and pool.device == str(ctx.device) and pool.waiting
        second = scorer.faithful(code, "faithful-tiny")
        assert faithful._contexts["faithful-tiny"] is ctx and faithful._pool is pool
        assert first.valid and second.valid and _numbers(first) == _numbers(second)
        assert second.isolation.startswith("namespaces")
    finally:
        scorer.close()
    assert pool.waiting == () and ctx._prefix is None and scorer._faithful is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_session_on_unindexed_cuda_device_serves_dense_selections(tmp_path):
    """A session opened on "cuda" (no index) gets the masker's "cuda:0" tensors back as data."""
    from evaluator.faithful.decode import CallInputs
    from evaluator.faithful.score import session_selector
    from evaluator.sandbox.session import SandboxSession

    q = torch.randn(2, 3, 1, 8, device="cuda")
    keys = torch.randn(2, 1, 16, 8, device="cuda")
    pos = torch.tensor([15], device="cuda")
    with SandboxSession(SINK_WINDOW, "cuda", 0.5, 0, {"row_groups": 1, "max_len": 16}) as session:
        weights = session_selector(session)(CallInputs(0, 1, 0, q, keys, keys[:, :, 15:], 15, pos, 0.35))
    assert weights.shape == (2, 3, 1, 16) and weights.device.type == "cuda"
    assert int(weights.ne(0).sum()) == 2 * 3 * 8  # 4 sinks + the latest 4: half of 16 causal keys


@pytest.fixture(scope="module")
def gpu_ctx():
    """'faithful-tiny' on the GPU: its sessions move calls through the shared device block."""
    context = FaithfulContext("faithful-tiny", "cuda")
    yield context
    context.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("seed", ["sink_window", "oracle_topk", "per_kv_head"])
def test_gpu_sessions_take_the_shared_block_and_score_as_in_process(gpu_ctx, tmp_path, seed):
    path = PER_KV_HEAD if seed == "per_kv_head" else ROOT / "seeds" / f"{seed}.py"
    sandboxed = gpu_ctx.score(path, 0.10)
    in_process = gpu_ctx.score(path, 0.10, in_process=True)
    assert sandboxed.valid and in_process.valid, (sandboxed.reason, in_process.reason)
    assert _numbers(sandboxed) == _numbers(in_process)
    calls, shared = gpu_ctx.last_calls
    assert calls == shared == gpu_ctx.model.config.num_hidden_layers * (gpu_ctx.spec.decode_steps + 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attack", ["nan", "exit", "channel_garbage", "not_a_tensor"])
def test_gpu_hostile_mid_session_is_contained_with_the_shared_block(gpu_ctx, tmp_path, attack):
    r, category = _hostile_score(gpu_ctx, tmp_path, attack)
    assert not r.valid and r.category == category, (r.category, r.reason)
    _assert_no_worker_left(gpu_ctx)
    assert gpu_ctx.score(SINK_WINDOW, 0.10).valid  # and the parent's GPU still scores
