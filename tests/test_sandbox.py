"""The sandbox: hostile candidates get the right category, nothing survives, scores match in-process.

Hostile cases run concurrently (each in its own worker) to keep the file fast on 2 cores.
Cases that test the OS-level layer run with the audit hook off, so they prove the layer
below the hook (the launcher's namespaces, nobody, rlimits, the PID-namespace kill) holds on
its own. ``tests/test_sandbox_unprivileged.py`` runs this file again as an ordinary user.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from evaluator.candidate import load_masker, masker_input
from evaluator.inprocess import score_masker
from evaluator.sandbox import SandboxLimits, WorkerPool, evaluate_in_sandbox, run_candidate
from evaluator.sandbox.isolation import live_descendants, scrubbed_env
from evaluator.scoring import FAILURE_CATEGORIES, aggregate, dense_weights, record_scores
from evaluator.workload import load_workload

HOSTILE = Path(__file__).parent / "hostile"
REPO = Path(__file__).resolve().parents[1]
SEEDS = REPO / "seeds"
ROOT = os.geteuid() == 0
LIMITS = SandboxLimits(wall_s=4.0, memory_mb=3072, log_bytes=256 * 1024, output_bytes=32 * 1024 * 1024)
NO_AUDIT = replace(LIMITS, audit_hook=False)
SOCKET_PORT = 47291
WRITE_TARGET = Path("/tmp/adrs-hostile-target")
SECRETS = {"OPENAI_API_KEY": "sk-hostile-1", "ANTHROPIC_API_KEY": "sk-hostile-2", "ADRS_LLM_API_KEY": "sk-hostile-3",
           "GITHUB_TOKEN": "sk-hostile-4", "AWS_SECRET_ACCESS_KEY": "sk-hostile-5", "DB_PASSWORD": "sk-hostile-6",
           "ADRS_LLM_BASE_URL": "http://sk-hostile", "OPENAI_BASE_URL": "http://sk-hostile", "MY_SERVICE_KEY": "sk-hostile-7"}

# case id -> (file, limits, expected category or None for valid, substring of the reason)
CASES = {
    "infinite_loop": ("infinite_loop", LIMITS, "timeout", "longer than"),
    "sleep_past_timeout": ("sleep_past_timeout", LIMITS, "timeout", "longer than"),
    "memory_blowup": ("memory_blowup", LIMITS, "memory", ""),
    "segfault": ("segfault", LIMITS, "crash", "SIGSEGV"),
    "os_exit": ("os_exit", LIMITS, "crash", "exited with code 0"),
    "forge_status": ("forge_status", LIMITS, "crash", "wrong number of selections"),
    "garbage_stream": ("garbage_stream", LIMITS, "crash", "malformed"),
    "trickle_stream": ("trickle_stream", LIMITS, "timeout", "longer than"),
    "read_secrets": ("read_secrets", NO_AUDIT, None, ""),
    "open_socket_audit": ("open_socket", LIMITS, None, ""),
    "open_socket_netns": ("open_socket", NO_AUDIT, None, ""),
    "write_outside_audit": ("write_outside", LIMITS, None, ""),
    "write_outside_os": ("write_outside", NO_AUDIT, None, ""),
    "monkeypatch": ("monkeypatch", LIMITS, "invalid", "NaN or infinite"),
    "print_megabytes": ("print_megabytes", LIMITS, "output", "printed more than"),
    "returns_too_much": ("returns_too_much", LIMITS, "output", "exceed"),
    "empty_selection": ("empty_selection", LIMITS, "invalid", "empty"),
    "nan_weights": ("nan_weights", LIMITS, "invalid", "NaN or infinite"),
    "inf_weights": ("inf_weights", LIMITS, "invalid", "NaN or infinite"),
    "negative_weights": ("negative_weights", LIMITS, "invalid", "negative"),
    "fractional_weights": ("fractional_weights", LIMITS, "invalid", "strictly between 0 and 1"),
    "future_tokens": ("future_tokens", LIMITS, "invalid", "future"),
    "wrong_shape": ("wrong_shape", LIMITS, "invalid", "shape"),
    "wrong_dtype": ("wrong_dtype", LIMITS, "invalid", "dtype torch.int64"),
    "wrong_device": ("wrong_device", LIMITS, "invalid", "is on meta"),
    "tensor_subclass": ("tensor_subclass", LIMITS, "invalid", "plain torch.Tensor"),
    "some_layers_only": ("some_layers_only", LIMITS, "invalid", "sample 0, layer 5: selection is empty"),
    "raises": ("raises", LIMITS, "exception", "KeyError"),
    "import_failure": ("import_failure", LIMITS, "import", "configuration missing"),
    "no_masker": ("no_masker", LIMITS, "import", "masker"),
    "syntax_error": ("syntax_error", LIMITS, "syntax", "line 5"),
}


@pytest.fixture(scope="module")
def tiny():
    """'tiny' cut to 4 layers of both samples (layers 3 and 5 are where hostile cases act)."""
    full = load_workload("tiny", progress=False)
    return replace(full, records=tuple(r for r in full.records if r.layer in (0, 3, 5, full.num_layers - 1)))


class _Listener:
    """A TCP listener on 127.0.0.1 that counts connections the candidate must not make."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.accepted = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
                self.accepted += 1
                conn.close()
            except OSError:
                pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.sock.close()


@pytest.fixture(scope="module", params=["fresh", "forked"])
def hostile_runs(request, tiny):
    """Run every case once, concurrently, with secrets in our environment and a listener up:
    in workers started as fresh interpreters, and in workers forked by pools' fork servers
    (one pool per set of limits, shared by the threads)."""
    saved = {k: os.environ.get(k) for k in SECRETS}
    os.environ.update(SECRETS)
    WRITE_TARGET.mkdir(mode=0o755, exist_ok=True)  # root-owned (when root), not writable by nobody
    listener = _Listener(SOCKET_PORT)
    distinct = {id(limits): limits for _, limits, _, _ in CASES.values()}
    pools = {key: WorkerPool(limits, spares=2) for key, limits in distinct.items()} if request.param == "forked" else {}

    def one(case: str):
        file, limits, _, _ = CASES[case]
        t0 = time.monotonic()
        run = run_candidate(HOSTILE / f"{file}.py", tiny, 0.1, limits=limits, pool=pools.get(id(limits)))
        return run, time.monotonic() - t0

    try:
        with ThreadPoolExecutor(max_workers=4) as ex:
            results = dict(zip(CASES, ex.map(one, CASES)))
        assert all(pool.waiting[0].forked for pool in pools.values())
    finally:
        for pool in pools.values():
            pool.close()
        listener.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield results, listener
    for leftover in (REPO / "runs" / "pwned.txt", REPO / "evaluator" / "pwned.py", WRITE_TARGET / "pwned.txt"):
        leftover.unlink(missing_ok=True)


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_category(case, hostile_runs):
    results, _ = hostile_runs
    run, elapsed = results[case]
    _, limits, category, reason = CASES[case]
    report = run.report
    if category is None:
        assert report.valid, f"{case}: {report.category}: {report.reason}\n{report.details}"
    else:
        assert not report.valid and report.category == category, f"{case}: {report.category}: {report.reason}\n{report.details}"
        assert reason in (report.reason or ""), report.reason
        assert report.category in FAILURE_CATEGORIES
    # Ends within its timeout (+5 s) once the job is handed over, and leaves no process behind.
    if run.outcome is not None:
        assert run.outcome.elapsed_s < limits.wall_s + 5, run.outcome.elapsed_s
        assert live_descendants(run.pgid, run.marker) == []


def test_exception_has_candidate_traceback(hostile_runs):
    report = hostile_runs[0]["raises"][0].report
    assert "raises.py" in report.details and "helper" in report.details
    assert "worker.py" not in report.details  # the model sees its own frames, not ours
    assert "sample 0, layer 0" in report.reason


def test_no_connection_reached_listener(hostile_runs):
    assert hostile_runs[1].accepted == 0


def test_nothing_written_outside_scratch(hostile_runs):
    assert not (REPO / "runs" / "pwned.txt").exists()
    assert not (REPO / "evaluator" / "pwned.py").exists()
    assert not (WRITE_TARGET / "pwned.txt").exists()


def test_parent_unaffected_by_monkeypatch(hostile_runs, tiny):
    import evaluator.scoring as scoring

    assert torch.isfinite(torch.tensor(float("nan"))).item() is False
    assert scoring.dense_weights.__module__ == "evaluator.scoring"


def test_fork_bomb_leaves_no_survivor(tiny):
    """Forks and new-session sleepers are all killed; the evaluation still ends on time."""
    t0 = time.monotonic()
    run = run_candidate(HOSTILE / "fork_bomb.py", tiny, 0.1, limits=replace(NO_AUDIT, nproc=64))
    assert run.report.category == "timeout", run.report.reason
    assert run.outcome.elapsed_s < NO_AUDIT.wall_s + 5
    assert time.monotonic() - t0 < NO_AUDIT.startup_s + NO_AUDIT.wall_s + 5
    time.sleep(0.2)
    assert live_descendants(run.pgid, run.marker) == []


def test_scrubbed_env_drops_secrets():
    env = scrubbed_env({**SECRETS, "PATH": "/bin", "HOME": "/root", "PYTHONPATH": "/x", "SOME_TOKEN": "t"}, "m", "/repo")
    assert not any(k in env for k in SECRETS) and "SOME_TOKEN" not in env
    assert env["PATH"] == "/bin" and env["HOME"] != "/root" and env["PYTHONPATH"].startswith("/repo")


def test_a_gpu_workers_env_has_one_cuda_queue_unless_the_user_chose_and_no_secrets():
    """GPU workers start with CUDA_DEVICE_MAX_CONNECTIONS=1 (contexts are made ~1.6x faster, and
    every evaluation makes one); a value the user set is passed on; CPU workers get neither."""
    from evaluator.sandbox.worker_process import worker_env

    gpu = worker_env({**SECRETS, "PATH": "/bin"}, "m", cuda=True)
    assert gpu["CUDA_DEVICE_MAX_CONNECTIONS"] == "1" and gpu["ADRS_SANDBOX_CUDA"] == "1"
    assert not any(k in gpu for k in SECRETS)
    assert worker_env({"CUDA_DEVICE_MAX_CONNECTIONS": "8"}, "m", cuda=True)["CUDA_DEVICE_MAX_CONNECTIONS"] == "8"
    cpu = worker_env({"PATH": "/bin"}, "m", cuda=False)
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in cpu and "ADRS_SANDBOX_CUDA" not in cpu


def _in_process(path: Path, workload, density_target: float):
    return score_masker(load_masker(path), workload, density_target)


STREAM_CASES = ("forge_status", "garbage_stream", "returns_too_much", "nan_weights", "some_layers_only", "future_tokens")


SPARSE_SINKS_AND_WINDOW = '''
import torch
from evaluator.contract import MaskerInput, SparseSelection


def masker(inp: MaskerInput):
    """The first 4 keys and the 12 before each query, in sparse form (weights 1 and 2)."""
    b, h = inp.queries.shape[:2]
    pos = inp.query_positions.to(inp.keys.device)[:, None]
    window = pos - torch.arange(12, device=pos.device)[None, :]
    idx = torch.cat([torch.arange(4, device=pos.device).expand(pos.shape[0], 4), window], dim=1)
    idx = torch.where((idx >= 0) & ((idx >= 4) | (torch.arange(16, device=pos.device) < 4)), idx, -1)
    w = torch.ones(idx.shape, device=idx.device)
    w[:, 4] = 2.0
    return SparseSelection(idx.expand(b, h, -1, -1), w.expand(b, h, -1, -1))
'''


def test_scoring_after_the_worker_and_alongside_it_give_the_same_reports(tiny, monkeypatch, tmp_path):
    """The parent scores a CPU slot's selections after the worker and a GPU slot's as they arrive
    (runner.score_after_worker): both ways give identical scores for seeds and for a sparse-form
    candidate (its weights are scored as they arrive in either mode), and the same category and
    reason for candidates whose stream is forged, garbage, over the cap or invalid midway."""
    from evaluator.sandbox import runner

    sparse = tmp_path / "sparse.py"
    sparse.write_text(SPARSE_SINKS_AND_WINDOW)
    reports: dict[bool, dict[str, object]] = {}
    with WorkerPool(LIMITS, spares=2) as pool:
        for after in (True, False):
            monkeypatch.setattr(runner, "score_after_worker", lambda device, after=after: after)
            got = {}
            for seed in ("oracle_topk", "vattention"):
                got[seed] = run_candidate(SEEDS / f"{seed}.py", tiny, 0.1, pool=pool).report
            got["sparse"] = run_candidate(sparse, tiny, 0.1, pool=pool).report
            for case in STREAM_CASES:
                got[case] = run_candidate(HOSTILE / f"{CASES[case][0]}.py", tiny, 0.1, pool=pool).report
            reports[after] = got
    for seed in ("oracle_topk", "vattention", "sparse"):
        a, b = reports[True][seed], reports[False][seed]
        assert a.valid and b.valid, (a.reason, b.reason)
        assert (a.error, a.density, a.kv_density) == (b.error, b.density, b.kv_density)
    expected = _in_process(sparse, tiny, 0.1)
    assert reports[True]["sparse"].combined_score == expected.combined_score
    for case in STREAM_CASES:
        category, reason = CASES[case][2], CASES[case][3]
        for after in (True, False):
            report = reports[after][case]
            assert report.category == category and reason in (report.reason or ""), (case, after, report.reason)
        assert reports[True][case].reason == reports[False][case].reason


REUSES_ITS_BUFFER = '''
import torch
from evaluator.contract import MaskerInput, budget, causal_mask

BUFFERS = {}


def masker(inp: MaskerInput):
    """Sinks and a window, every third key weighted by layer (so values travel, and another layer's
    would change the score), written into one buffer that every call returns and the next overwrites."""
    b, h = inp.queries.shape[:2]
    shape = (b, h, inp.query_positions.shape[0], inp.num_keys)
    out = BUFFERS.setdefault(shape, torch.empty(shape, device=inp.keys.device))
    keep = budget(inp)
    k = torch.arange(inp.num_keys, device=inp.keys.device)[None, :]
    pos = inp.query_positions.to(inp.keys.device)[:, None]
    selected = ((k < 2) | (k > pos - keep[:, None] + 2)) & causal_mask(inp)
    out.copy_((selected * (1.0 + (k % 3 == 0) * inp.layer_idx / 7)).expand(shape))
    return out
'''


def _reused_buffer_scores_as_in_process(workload, tmp_path) -> None:
    path = tmp_path / "reuses_its_buffer.py"
    path.write_text(REUSES_ITS_BUFFER)
    sandboxed = evaluate_in_sandbox(path, workload, 0.1, limits=LIMITS)
    expected = _in_process(path, workload, 0.1)
    assert sandboxed.valid and expected.valid, (sandboxed.reason, expected.reason)
    assert [(x.error, x.density) for x in sandboxed.per_layer] == [(x.error, x.density) for x in expected.per_layer]


def test_a_masker_that_reuses_its_output_buffer_scores_as_in_process(tiny, tmp_path):
    """The worker finishes a record's encoding after the next masker call has begun (one record in
    flight); a masker that overwrites the tensor it returned must not change what was sent."""
    _reused_buffer_scores_as_in_process(tiny, tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_masker_that_reuses_its_output_buffer_scores_as_in_process_on_the_gpu(tmp_path):
    """As above where it matters: on a GPU the packing and copy to the host are queued, not done."""
    full = load_workload("tiny", device="cuda", progress=False)
    _reused_buffer_scores_as_in_process(replace(full, records=full.records[:12]), tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_workers_batched_encoding_scores_and_reports_as_expected():
    """On a GPU the worker encodes selections a batch at a time (encode_batch): seeds still score
    exactly as in process, and the stream-sensitive hostile cases (a bad selection midway, too
    much) still get their category and the first problem's place."""
    full = load_workload("tiny", device="cuda", progress=False)
    gpu = replace(full, records=tuple(r for r in full.records if r.layer in (0, 3, 5, full.num_layers - 1)))
    with WorkerPool(LIMITS, cuda=True, spares=2) as pool:
        for seed in ("sink_window", "oracle_topk", "vattention"):
            got = run_candidate(SEEDS / f"{seed}.py", gpu, 0.1, pool=pool).report
            expected = _in_process(SEEDS / f"{seed}.py", gpu, 0.1)
            assert got.valid and got.combined_score == expected.combined_score, (seed, got.reason)
        # Not forge_status and garbage_stream: they write into the first write-only pipe they find,
        # which in a GPU worker is one of the CUDA driver's own (their score is then valid); the
        # CPU tests cover them.
        for case in ("returns_too_much", "nan_weights", "some_layers_only", "future_tokens"):
            report = run_candidate(HOSTILE / f"{CASES[case][0]}.py", gpu, 0.1, pool=pool).report
            assert report.category == CASES[case][2] and CASES[case][3] in (report.reason or ""), (case, report.reason)


@pytest.mark.parametrize("seed", ["oracle_topk", "group_hybrid"])
def test_batched_scorer_matches_record_by_record(tiny, seed):
    """The chunked scorer gives record_scores' numbers (to rounding) for every record, kv_density included
    (group_hybrid answers per KV head, which both paths broadcast to the query heads)."""
    masker = load_masker(SEEDS / f"{seed}.py")
    rows = [(r.sample, r.layer, *record_scores(r, dense_weights(masker(masker_input(r, 0.1, tiny.spec.seed)), r)))
            for r in tiny.records]
    one_by_one = aggregate(rows, 0.1)
    batched = _in_process(SEEDS / f"{seed}.py", tiny, 0.1)
    assert batched.density == one_by_one.density
    assert batched.kv_density == one_by_one.kv_density is not None
    assert batched.error == pytest.approx(one_by_one.error, rel=1e-9)
    assert [x.error for x in batched.per_layer] == pytest.approx([x.error for x in one_by_one.per_layer], rel=1e-9)
    assert [x.kv_density for x in batched.per_layer] == [x.kv_density for x in one_by_one.per_layer]


PER_KV_HEAD = {
    "bool": "sel = base",
    "weighted": "sel = base.float() * (1.0 + (torch.arange(inp.num_keys) % 3 == 0).float())",
    "nan": "sel = base.float()\n    sel[0, 0, 0, 0] = float('nan')",
    "int": "sel = base.int()",
}


@pytest.mark.parametrize("kind", list(PER_KV_HEAD))
def test_per_kv_head_selections_travel_per_kv_head_and_score_as_in_process(tiny, tmp_path, kind):
    """A dense per-KV-head selection crosses the pipe at ``[b, h_kv, q, k]`` (1/G of the bytes)
    and is repeated for each query head by the parent: the report equals the in-process one, a
    valid one bit for bit and an invalid one reason for reason; a malformed one (int) takes the
    validator's path, also as in process."""
    body = PER_KV_HEAD[kind]
    path = tmp_path / f"per_kv_{kind}.py"
    path.write_text(f"""import torch
from evaluator.contract import MaskerInput, budget, causal_mask

def masker(inp: MaskerInput):
    keep = budget(inp)
    k = torch.arange(inp.num_keys)[None, :]
    lead = ((k < 4) | (k > inp.query_positions[:, None] - keep[:, None])) & causal_mask(inp)
    b, h_kv = inp.keys.shape[0], inp.keys.shape[1]
    base = (lead & (torch.arange(inp.num_keys) % (h_kv + 1) != 0)).expand(b, h_kv, -1, -1).clone()
    base[:, 0, :, :2] = False  # the KV heads differ: a broadcast of the wrong head would show
    {body}
    return sel
""")
    rec = tiny.records[0]
    sel = load_masker(path)(masker_input(rec, 0.1, tiny.spec.seed))
    b, h, q, k = rec.weights_shape
    kv = (b, rec.keys.shape[1], q, k)
    want = kv if kind != "int" else rec.weights_shape
    _, meta = devicepack.encode_for_wire(sel, rec.weights_shape, rec.keys.shape[1], str(rec.queries.device))
    assert tuple(meta["shape"]) == tuple(want) and kv[1] < h
    boxed = evaluate_in_sandbox(path, tiny, 0.1)
    ref = _in_process(path, tiny, 0.1)
    assert boxed.valid == ref.valid == (kind in ("bool", "weighted")), (boxed.reason, ref.reason)
    if ref.valid:
        assert (boxed.combined_score, boxed.error, boxed.density, boxed.kv_density) == \
            (ref.combined_score, ref.error, ref.density, ref.kv_density)
        assert boxed.kv_density < boxed.density * 1.01  # shared by each group: no extra rows
    else:
        assert (boxed.category, boxed.reason) == (ref.category, ref.reason)


SINK_WINDOW = '''import torch
from evaluator.contract import MaskerInput, budget, causal_mask

# EVOLVE-BLOCK-START
def masker(inp: MaskerInput):
    keep = budget(inp)
    k = torch.arange(inp.num_keys)[None, :]
    sel = ((k < 4) | (k > inp.query_positions[:, None] - keep[:, None])) & causal_mask(inp)
    return sel.expand(inp.queries.shape[0], inp.queries.shape[1], -1, -1)
# EVOLVE-BLOCK-END
'''


def _seed_files(tmp_path: Path) -> list[Path]:
    seeds = sorted(SEEDS.glob("*.py"))
    if seeds:
        return seeds
    path = tmp_path / "sink_window.py"
    path.write_text(SINK_WINDOW)
    return [path]


def test_a_workers_status_carries_its_own_clock(tiny, tmp_path):
    """A successful worker reports where its time went (for benchmarks): three non-negative parts
    that fit inside the parent's own measure of the run, the last split into masker, encoding and
    sending time that fit inside it."""
    run = run_candidate(_seed_files(tmp_path)[0], tiny, 0.1, limits=LIMITS)
    assert run.report.valid, run.report.reason
    timing = run.outcome.status["timing"]
    parts = ("to_first_call_s", "first_call_s", "after_first_call_s")
    phases = ("masker_s", "encode_s", "send_s")
    assert set(timing) == {*parts, *phases}
    assert all(isinstance(v, float) and v >= 0 for v in timing.values()), timing
    assert sum(timing[k] for k in parts) <= run.outcome.elapsed_s, (timing, run.outcome.elapsed_s)
    assert 0 < sum(timing[k] for k in phases) <= timing["after_first_call_s"], timing


def test_seeds_score_exactly_as_in_process(tiny, tmp_path):
    """Every seed (deterministic, sampled and sparse-form ones) scores bit-identically."""
    seeds = _seed_files(tmp_path)
    with WorkerPool(SandboxLimits(wall_s=60)) as pool:
        for path in seeds:
            sandboxed = evaluate_in_sandbox(path, tiny, 0.1, pool=pool)
            expected = _in_process(path, tiny, 0.1)
            assert sandboxed.valid, f"{path.name}: {sandboxed.category}: {sandboxed.reason}\n{sandboxed.details}"
            assert sandboxed.combined_score == expected.combined_score, path.name
            assert sandboxed.error == expected.error and sandboxed.density == expected.density
            assert [(x.error, x.density) for x in sandboxed.per_layer] == [(x.error, x.density) for x in expected.per_layer]


def test_warm_pool_worker_serves_one_candidate(tiny):
    """A pooled worker is used once: the second evaluation gets a different process, also with
    several spares, and neither is kept as a spare."""
    with WorkerPool(LIMITS, spares=2) as pool:
        a = run_candidate(HOSTILE / "empty_selection.py", tiny, 0.1, pool=pool)
        b = run_candidate(HOSTILE / "empty_selection.py", tiny, 0.1, pool=pool)
        spares = {w.pgid for w in pool.waiting}
    assert a.pgid != b.pgid and a.report.category == b.report.category == "invalid"
    assert len(spares) == 2 and not spares & {a.pgid, b.pgid}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_memory_blowup():
    workload = load_workload("tiny", device="cuda", progress=False)
    limits = replace(LIMITS, wall_s=20, gpu_memory_fraction=0.2)
    run = run_candidate(HOSTILE / "gpu_memory_blowup.py", workload, 0.1, limits=limits)
    assert run.report.category == "memory", run.report.reason
    assert live_descendants(run.pgid, run.marker) == []
    ok = evaluate_in_sandbox(HOSTILE / "empty_selection.py", workload, 0.1, limits=limits)
    assert ok.category == "invalid"  # the GPU path validates too


def test_worker_start_failure_is_harness_not_candidate(tiny):
    """A worker that cannot start (here: no time to import torch) is our failure, not the candidate's."""
    run = run_candidate(HOSTILE / "empty_selection.py", tiny, 0.1, limits=replace(LIMITS, startup_s=0.01))
    assert run.report.category == "harness", run.report.reason
    assert live_descendants(run.pgid, run.marker) == []


# ---------------------------------------------------------------- fast-path selection encoding
from evaluator.sandbox import devicepack  # noqa: E402
from evaluator.sandbox.transport import ProtocolError, decode_selection, encode_selection  # noqa: E402

ENC_SHAPE = (1, 3, 5, 13)  # 195 weights: not a multiple of 8, so the padding bits are exercised


def _selections(device: str) -> dict[str, torch.Tensor]:
    """Dense selections of every kind a masker returns: bool, float of ones, 1/p weights, NaN, half."""
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(ENC_SHAPE, generator=gen) < 0.35
    weighted = mask.float() * torch.where(torch.rand(ENC_SHAPE, generator=gen) < 0.5, 1.0, 1 / 0.3)
    nan = weighted.clone()
    nan[0, 1, 2, :2] = torch.tensor([float("nan"), float("inf")])
    sels = {"bool": mask, "ones": mask.float(), "weighted": weighted, "nan": nan, "half": weighted.half(),
            "none": torch.zeros(ENC_SHAPE, dtype=torch.bool), "all": torch.ones(ENC_SHAPE),
            "expanded_bool": mask[:, :1].expand(ENC_SHAPE)}
    return {k: v.to(device) for k, v in sels.items()}


def _same_bytes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Equal keys, dtypes, shapes and bytes (NaN payloads compared as bits, not as values)."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and torch.equal(a[k].cpu().contiguous().view(torch.uint8), b[k].cpu().contiguous().view(torch.uint8)) for k in a)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001])
def test_torch_packbits_match_numpy_on_host(n):
    """The torch formulation (what runs on a GPU) agrees with numpy, which the host path uses."""
    import numpy as np

    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.3
    packed = devicepack._packbits_torch(mask)
    assert torch.equal(packed, torch.from_numpy(np.packbits(mask.numpy())))
    assert torch.equal(devicepack.packbits(mask), packed)
    assert torch.equal(devicepack._unpackbits_torch(packed, n), mask)
    assert devicepack.unpackbits(packed, n).dtype == torch.bool and torch.equal(devicepack.unpackbits(packed, n), mask)


def test_spare_warm_up_runs_on_workload_shapes(tiny):
    """The spare's rehearsal (trusted code before any candidate) works at a real workload's GQA
    shapes, leaves the record untouched, and the encoder it warms still encodes exactly."""
    from safetensors.torch import save

    from evaluator.sandbox.warmup import warm_encoder, warm_masker_ops, warm_seed_ops

    rec = tiny.records[0]
    before = (rec.queries.clone(), rec.keys.clone())
    warm_masker_ops(rec)
    warm_seed_ops(rec)
    warm_encoder(devicepack.encode_selection_on_device, save, "cpu", rec.weights_shape)
    assert torch.equal(rec.queries, before[0]) and torch.equal(rec.keys, before[1])


@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 63, 64, 65, 1001])
def test_popcount_counts_only_the_first_bits(count):
    """The host-side size check counts exactly what unpackbits(packed, count) yields: the padding
    bits of the last byte (all set here, as a hostile worker may send them) are ignored."""
    import numpy as np

    gen = torch.Generator().manual_seed(count)
    packed = torch.randint(0, 256, ((count + 7) // 8,), generator=gen, dtype=torch.uint8)
    if count % 8:
        packed[-1] |= (1 << (8 - count % 8)) - 1
    want = int(np.unpackbits(packed.numpy(), count=count).sum())
    assert devicepack.popcount(packed, count) == want


@pytest.mark.parametrize("kind", list(_selections("cpu")))
def test_worker_encoding_is_the_transport_encoding(kind, tmp_path):
    """The worker's fast path writes byte-identical files and the parent's unpacking gives the
    same float32 weights as the numpy decoder, for every kind of dense selection."""
    from safetensors.torch import load_file, save_file

    sel = _selections("cpu")[kind]
    ours, meta = devicepack.encode_selection_on_device(sel, ENC_SHAPE, "cpu")
    ref, ref_meta = encode_selection(sel, ENC_SHAPE, "cpu")
    assert meta == ref_meta and _same_bytes(ours, ref), kind
    path = tmp_path / "rec0.safetensors"
    save_file(ours, str(path))
    rec = load_workload("tiny", progress=False).records[0]
    rec = replace(rec, queries=rec.queries[:, :3, :5], positions=rec.positions[:5], keys=rec.keys[:, :, :13])
    assert rec.weights_shape == ENC_SHAPE and devicepack.dense_meta_ok(meta, ENC_SHAPE, rec.queries.device)
    fast = devicepack.decode_dense_on_device(load_file(str(path)), ENC_SHAPE, torch.device("cpu"))
    slow = decode_selection(path, meta, rec)
    expected = sel.to(torch.float32)
    for got in (fast, slow):
        assert got.dtype == torch.float32 and got.shape == ENC_SHAPE
        assert torch.equal(got.view(torch.int32), expected.contiguous().view(torch.int32)), kind  # bit for bit


def _batch_decodes(device: str) -> None:
    """The stacked decoder on ``device`` against each record decoded alone on the host, bit for bit,
    for one batch of every kind, sent per query head and per KV head (195 weights: padded bits;
    odd counts of selected weights: padded ``ne1`` bytes in the middle of the batch)."""
    sels = _selections("cpu")
    for heads, kv_heads in ((3, 3), (6, 3)):
        sent, want = [], []
        for sel in sels.values():
            tensors, meta = devicepack.encode_selection_on_device(sel, ENC_SHAPE, "cpu")
            meta = {**meta, "device": str(torch.device(device))}
            x = devicepack.dense_selection_bytes(meta, tensors, (1, heads, 5, 13), kv_heads, torch.device(device))
            assert x is not None and x.heads == heads
            sent.append(x)
            want.append(devicepack.decode_dense_batch([x], torch.device("cpu"))[0])
        got = devicepack.decode_stacked(sent, torch.device(device))
        assert len(got) == len(want)
        for kind, g, w in zip(sels, got, want):
            assert g.device.type == torch.device(device).type and g.shape == (1, heads, 5, 13) == w.shape, kind
            assert torch.equal(g.cpu().view(torch.int32), w.view(torch.int32)), kind


def test_a_batch_of_selections_decodes_as_each_alone():
    _batch_decodes("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_batch_of_selections_decodes_as_each_alone_on_the_gpu():
    _batch_decodes("cuda")


def _batch_encodes(device: str) -> None:
    """The worker's batch encoder gives every row the bytes and metadata of the one-record encoder,
    for every kind of dense selection, sent per query head and per KV head, including rows a
    masker returned in a tensor it then overwrites for the next record."""
    from evaluator.sandbox.encode_batch import EncodeBatch

    shape = (1, 6, 4, 16)  # 384 weights: whole bytes per row; per KV head (3 heads) 192
    gen = torch.Generator().manual_seed(5)
    mask = torch.rand(shape, generator=gen) < 0.3
    weighted = mask.float() * torch.where(torch.rand(shape, generator=gen) < 0.5, 1.0, 1 / 0.3)
    nan = weighted.clone()
    nan[0, 1, 2, :2] = torch.tensor([float("nan"), float("inf")])
    per_query = [mask, mask.float(), weighted, nan, weighted.half(), torch.zeros(shape, dtype=torch.bool), torch.ones(shape),
                 mask[:, :1].expand(shape)]
    per_kv = [mask[:, ::2].float(), weighted[:, ::2], nan[:, ::2]]
    dev = "cuda:0" if device == "cuda" else "cpu"
    unit_only = per_query[:2] + per_query[5:7]  # the path with one wait for the device
    for sels in (per_query, per_kv, unit_only):
        sels = [s.to(device) for s in sels]
        batch = EncodeBatch(dev, capacity=len(sels) + 1)
        for sel in sels:
            assert batch.add(sel, shape, 3)
        reused = sels[2].clone()
        assert batch.add(reused, shape, 3)
        reused.fill_(7.0)  # the masker's next call overwrites the tensor it returned
        assert not batch.add([1, 2], shape, 3)  # not a tensor: encoded alone
        other = per_kv[0] if sels[0].shape == shape else per_query[0]
        assert not batch.add(other.to(device), shape, 3) and len(batch) == len(sels) + 1  # another wire shape
        got = batch.drain()
        want = [devicepack.encode_for_wire(sel, shape, 3, dev) for sel in sels + [sels[2]]]
        assert len(got) == len(want) and len(batch) == 0
        for k, ((tensors, meta), (ref, ref_meta)) in enumerate(zip(got, want)):
            assert meta == ref_meta and _same_bytes(tensors, ref), k


def test_a_batch_of_selections_encodes_as_each_alone():
    _batch_encodes("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_batch_of_selections_encodes_as_each_alone_on_the_gpu():
    _batch_encodes("cuda")


def test_device_decoder_rejects_tampered_data():
    """A worker that lies about its data gets ProtocolError (a crash report), never wrong weights."""
    sel = _selections("cpu")["weighted"]
    good, _ = devicepack.encode_selection_on_device(sel, ENC_SHAPE, "cpu")
    cpu = torch.device("cpu")
    tampered = {
        "missing vals": {k: v for k, v in good.items() if k != "vals"},
        "short nz": {**good, "nz": good["nz"][:-1]},
        "nz as int32": {**good, "nz": good["nz"].to(torch.int32)},
        "extra value": {**good, "vals": torch.cat([good["vals"], torch.ones(1)])},
        "vals as float64": {**good, "vals": good["vals"].double()},
        "vals 2-d": {**good, "vals": good["vals"][None]},
        "short ne1": {**good, "ne1": good["ne1"][:-1]},
    }
    for what, tensors in tampered.items():
        with pytest.raises(ProtocolError):
            devicepack.decode_dense_on_device(tensors, ENC_SHAPE, cpu)
            pytest.fail(f"accepted {what}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", list(_selections("cpu")))
def test_gpu_encoding_is_the_transport_encoding(kind):
    """On a GPU the worker packs on the device and the parent unpacks there: same bytes, same weights."""
    sel = _selections("cuda")[kind]
    ours, meta = devicepack.encode_selection_on_device(sel, ENC_SHAPE, str(sel.device))
    ref, _ = encode_selection(sel.cpu(), ENC_SHAPE, "cpu")
    assert _same_bytes(ours, ref), kind
    back = devicepack.decode_dense_on_device(ours, ENC_SHAPE, sel.device)
    assert back.device == sel.device
    assert torch.equal(back.cpu().view(torch.int32), sel.cpu().to(torch.float32).contiguous().view(torch.int32)), kind


def test_pool_starts_the_replacement_after_the_job(tiny):
    """run_candidate leaves the spare's start-up until its worker has exited (so it does not steal
    the candidate's cores), and the pool is warm again afterwards; plain take() still starts it at once."""
    with WorkerPool(LIMITS) as pool:
        pool.defer_spares = True  # as on a machine of few cores (the default there)
        (first,) = pool.waiting
        with pool.deferred_spare():
            taken = pool.take()
        assert taken is first and pool.waiting == ()
        taken.close()
        run = run_candidate(HOSTILE / "empty_selection.py", tiny, 0.1, pool=pool)
        assert run.report.category == "invalid", run.report.reason
        (spare,) = pool.waiting
        assert spare.pgid != run.pgid and spare.alive()
        plain = pool.take()
        assert plain is spare and len(pool.waiting) == 1 and pool.waiting[0] is not spare
        plain.close()
        pool.defer_spares = False  # many cores: the replacement starts at once, even inside the block
        with pool.deferred_spare():
            again = pool.take()
        assert len(pool.waiting) == 1 and pool.waiting[0] is not again
        again.close()


def test_pool_keeps_several_spares_hands_out_fresh_live_ones_and_close_kills_all(tiny):
    """spares=3: three distinct workers start at once; takes never block, prefer a ready spare,
    never hand out one that died while waiting, and start replacements (on small machines
    inside ``deferred_spare`` only at ``replenish``); close() leaves no process behind."""
    seen = []
    with WorkerPool(LIMITS, spares=3) as pool:
        pool.defer_spares = False
        first = pool.waiting
        seen += first
        assert len({w.marker for w in first}) == 3 and all(w.alive() for w in first)
        assert not first[0].wait_ready(0)  # still importing torch; asking does not spoil the answer
        assert pool.wait_ready(LIMITS.startup_s, every=True) and first[0].wait_ready(0)
        a, b = pool.take(), pool.take()
        assert (a, b) == first[:2] and len(pool.waiting) == 3 and pool.waiting[0] is first[2]
        seen += pool.waiting[1:]
        assert len({w.marker for w in seen}) == 5 and all(w.alive() for w in seen)
        os.killpg(first[2].pgid, 9)  # a spare dies while waiting (the OOM killer, say)
        first[2].proc.wait(5)
        t0 = time.monotonic()
        c = pool.take()  # the other spares are still starting: the oldest live one, at once
        assert time.monotonic() - t0 < 2 and c.alive() and (c is seen[3] or c.wait_ready(0))
        assert first[2] not in pool.waiting and len(pool.waiting) == 3
        seen += pool.waiting[1:]
        pool.defer_spares = True
        with pool.deferred_spare():
            d = pool.take()
        assert (d is seen[4] or d.wait_ready(0)) and len(pool.waiting) == 2
        pool.replenish()
        assert len(pool.waiting) == 3
        seen += pool.waiting[-1:]
        for worker in (a, b, c, d):
            worker.release()
    assert pool.waiting == ()
    assert not [w for w in seen if live_descendants(w.pgid, w.marker)]


def test_spare_preloads_the_workload_and_scores_the_same(tiny):
    """After one candidate the pool's spares load the workload's inputs before their job; the
    job then carries no inputs, and the numbers do not change. A spare preloaded with another
    workload's inputs is sent this one's."""
    from evaluator.sandbox.transport import workload_inputs

    seed = SEEDS / "oracle_topk.py"
    with WorkerPool(SandboxLimits(wall_s=60), device="cpu") as pool:
        assert pool.waiting[0].preloaded is None
        cold = run_candidate(seed, tiny, 0.1, pool=pool)
        assert len(pool.waiting) == 1 and pool.waiting[0].preloaded == workload_inputs(tiny)
        warm = run_candidate(seed, tiny, 0.1, pool=pool)
        other = replace(tiny, records=tiny.records[:2])
        mixed = run_candidate(seed, other, 0.1, pool=pool)  # this spare holds tiny's inputs, not other's
    assert cold.report.valid and warm.report.valid and mixed.report.valid, (warm.report.reason, mixed.report.reason)
    assert warm.report.combined_score == cold.report.combined_score == score_masker(load_masker(seed), tiny, 0.1).combined_score
    assert mixed.report.n_records == 2 and mixed.report.combined_score == score_masker(load_masker(seed), other, 0.1).combined_score


def test_spares_started_before_the_workload_was_known_load_it_while_they_wait(tiny):
    """Spares that were ready before the pool's first candidate load its inputs as soon as the
    pool knows them (not on their own candidate's clock); one so loaded scores the same."""
    from evaluator.sandbox.transport import workload_inputs

    seed = SEEDS / "sink_window.py"
    with WorkerPool(SandboxLimits(wall_s=60), device="cpu", spares=3) as pool:
        pool.defer_spares = False
        assert pool.wait_ready(60, every=True)
        early = pool.waiting
        assert all(w.preloaded is None for w in early)
        cold = run_candidate(seed, tiny, 0.1, pool=pool)  # takes early[0]; the two others are told
        inputs = workload_inputs(tiny)
        assert [w.preloaded for w in early[1:]] == [inputs, inputs]
        assert pool.wait_ready(60, every=True) and all(w.preloaded == inputs for w in pool.waiting)
        assert pool.waiting[0] is early[1]
        warm = run_candidate(seed, tiny, 0.1, pool=pool)  # served by early[1], preloaded late
        assert early[1] not in pool.waiting
    assert cold.report.valid and warm.report.valid, warm.report.reason
    assert warm.report.combined_score == cold.report.combined_score == score_masker(load_masker(seed), tiny, 0.1).combined_score


def test_a_harness_holding_over_1024_fds_still_runs_candidates_and_channels(tiny):
    """select(2) refuses fds numbered 1024 or more; a process holding a workload's shared-memory
    tensors has that many open, and every fd it opens next (worker sockets, pipes) is past that line."""
    from evaluator.sandbox.channel import DeadlineIO, pack, spin_until_readable

    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        seed = SEEDS / "sink_window.py"
        with WorkerPool(SandboxLimits(wall_s=60), device="cpu") as pool:
            run = run_candidate(seed, tiny, 0.1, pool=pool)
        assert run.report.valid, run.report.reason
        assert run.report.combined_score == score_masker(load_masker(seed), tiny, 0.1).combined_score
        r, w = os.pipe()
        assert min(r, w) >= 1024
        io = DeadlineIO(r, w, check=lambda: None, max_payload=1 << 20)
        io.send(pack({"op": "ping"}, {"x": torch.arange(3.0)}))
        assert spin_until_readable(r, 1.0)
        header, tensors = io.receive()
        assert header["op"] == "ping" and tensors["x"].tolist() == [0.0, 1.0, 2.0]
        os.close(r)
        os.close(w)
    finally:
        for fd in held:
            os.close(fd)


def test_read_ahead_keeps_order_bounds_what_it_holds_and_ends_where_the_stream_ends():
    """The parent's result reader: messages come out in order, whole even when a message needs
    many reads; past its limit it leaves the rest in the pipe (the writer waits, memory stays
    bounded); what ended the stream is raised after the messages read before it."""
    import fcntl
    import termios

    from evaluator.sandbox.channel import DeadlineIO, ReadAhead, pack, write_blocking
    from evaluator.sandbox.worker_process import widen_pipe

    class Ended(Exception):
        pass

    r, w = os.pipe()
    widen_pipe(w, 1 << 20)  # room for every message: only the reader's limit can leave them there
    msgs = [pack({"i": i}, {"x": torch.full((5000,), float(i))}) for i in range(12)]  # ~20 KB each
    writer = threading.Thread(target=lambda: [write_blocking(w, m) for m in msgs])
    writer.start()
    closed = threading.Event()

    def check() -> None:
        if closed.is_set():
            raise Ended()

    reader = ReadAhead(DeadlineIO(r, None, check, max_payload=1 << 20), limit=30_000, last_key="status")
    try:
        writer.join(timeout=5)  # every message in the pipe or in the reader, which stops at its limit
        time.sleep(0.1)  # time for the reader to take what it would
        unread = bytearray(4)
        fcntl.ioctl(r, termios.FIONREAD, unread)
        assert int.from_bytes(unread, sys.byteorder) > 100_000, "the reader drained past its limit"
        got = [reader.get() for _ in msgs]
        assert [h["i"] for h, _, _ in got] == list(range(12))
        assert all(torch.equal(t["x"], torch.full((5000,), float(i))) and n == 20_000 for i, (_, t, n) in enumerate(got))
        writer.join()
        os.close(w)
        closed.set()
        with pytest.raises(Ended):
            reader.get()
    finally:
        reader.stop()
        closed.set()
        reader.join()
        os.close(r)


def test_a_stopped_read_ahead_ends_while_its_writer_still_writes():
    """What kills the worker may leave a descendant holding the pipe and trickling bytes; the
    reader must not outlive the run until the deadline: stopped, it ends within a wait or a chunk."""
    import struct

    from evaluator.sandbox.channel import DeadlineIO, ReadAhead

    r, w = os.pipe()
    done = threading.Event()

    def trickle() -> None:  # a header announced, then a byte at a time: no whole message for 10 s
        os.write(w, struct.pack("<QQ", 1000, 0))
        while not done.wait(0.01):
            os.write(w, b"x")

    writer = threading.Thread(target=trickle)
    writer.start()
    reader = ReadAhead(DeadlineIO(r, None, lambda: None, max_payload=1 << 20), limit=1 << 20, last_key="status")
    try:
        time.sleep(0.2)
        t0 = time.monotonic()
        reader.stop()
        reader.join()
        assert time.monotonic() - t0 < 1.0
    finally:
        done.set()
        writer.join()
        os.close(w)
        os.close(r)


# ---------------------------------------------------------------- isolation level and the opt-out
from evaluator.sandbox import IsolationUnavailable  # noqa: E402


def test_no_isolation_means_nothing_runs(tiny):
    """Where no namespaces can be set up (forced here), a candidate is refused, not run weaker."""
    with pytest.raises(IsolationUnavailable):
        run_candidate(SEEDS / "sink_window.py", tiny, 0.1, limits=replace(LIMITS, isolate=False))


def test_explicit_opt_out_runs_and_every_report_says_so(tiny):
    report = evaluate_in_sandbox(SEEDS / "sink_window.py", tiny, 0.1,
                                 limits=replace(LIMITS, isolate=False, unsafe_allow_unisolated=True))
    assert report.valid and report.isolation.startswith("NOT ISOLATED"), report.isolation
    isolated = evaluate_in_sandbox(SEEDS / "sink_window.py", tiny, 0.1, limits=LIMITS)
    assert isolated.isolation.startswith("namespaces") and isolated.combined_score == report.combined_score


# ---------------------------------------------------------------- the fork server
def test_forked_workers_score_as_fresh_ones_and_the_server_ends_with_the_pool(tiny):
    """Workers forked by the pool's fork server give the fresh workers' scores exactly; closing
    the pool ends the server, and nothing carrying its marker (server, launchers, workers) remains."""
    from evaluator.sandbox.isolation import MARKER_VAR

    seed = SEEDS / "oracle_topk.py"
    fresh = evaluate_in_sandbox(seed, tiny, 0.1, limits=LIMITS)
    with WorkerPool(LIMITS, spares=2) as pool:
        server = pool._server
        assert server is not None and all(w.forked for w in pool.waiting)
        runs = [run_candidate(seed, tiny, 0.1, pool=pool) for _ in range(2)]
        marker = [v for v in (Path(f"/proc/{server.proc.pid}/environ").read_bytes().split(b"\0"))
                  if v.startswith(MARKER_VAR.encode())][0].split(b"=", 1)[1].decode()
    assert server.proc.wait(10) == 0
    for run in runs:
        assert run.report.valid and run.report.combined_score == fresh.combined_score
        assert run.report.isolation == fresh.isolation
        assert [x.error for x in run.report.per_layer] == [x.error for x in fresh.per_layer]
    assert live_descendants(server.proc.pid, marker) == []


def test_a_dead_fork_server_means_fresh_workers_not_lost_candidates(tiny):
    """SIGKILL the fork server: the spares it forked still serve (each a live process with its
    own lifeline), their replacements start as fresh interpreters, and every candidate scores."""
    with WorkerPool(LIMITS, spares=2) as pool:
        pool.defer_spares = False
        assert pool.wait_ready(LIMITS.startup_s, every=True)
        orphans = pool.waiting
        pool._server.proc.kill()
        pool._server.proc.wait(10)
        assert all(w.alive() for w in orphans)
        runs = [run_candidate(SEEDS / "sink_window.py", tiny, 0.1, pool=pool) for _ in range(3)]
        assert all(r.report.valid for r in runs), [r.report.reason for r in runs]
        assert len({r.report.combined_score for r in runs}) == 1
        assert [r.pgid for r in runs[:2]] == [w.pgid for w in orphans]
        assert pool.waiting and not any(w.forked for w in pool.waiting)
    assert all(live_descendants(r.pgid, r.marker) == [] for r in runs)


def test_a_request_the_server_never_served_signals_nothing(tiny):
    """The server dies with a request queued (here: while it still imports torch): that worker
    has no pid, reads as dead, and closing it signals nothing (a pid of 0 would be our own group)."""
    from evaluator.sandbox.spawn import ForkServer
    from evaluator.sandbox.worker_process import Worker, fork_server_env

    server = ForkServer(fork_server_env())
    try:
        worker = Worker(LIMITS, server=server)  # queued: the server is importing torch
        server.proc.kill()
        server.proc.wait(10)
        assert worker.forked and not worker.wait_ready(5) and not worker.alive()
        assert worker.pgid is None and worker.proc.returncode < 0
        worker.release()  # must not raise, nor signal a group (a SIGKILL to ours would end this test run)
    finally:
        server.close()


def test_no_fork_server_under_the_opt_out_or_when_switched_off(tiny, monkeypatch):
    """The explicit opt-out has no PID namespace to end a forked worker's strays: fresh workers only."""
    with WorkerPool(replace(LIMITS, isolate=False, unsafe_allow_unisolated=True)) as pool:
        assert pool._server is None and not pool.waiting[0].forked
    monkeypatch.setenv("ADRS_FORK_SERVER", "0")
    with WorkerPool(LIMITS) as pool:
        assert pool._server is None and not pool.waiting[0].forked
        assert run_candidate(SEEDS / "sink_window.py", tiny, 0.1, pool=pool).report.valid


def test_cache_and_run_dirs_are_private(tmp_path, monkeypatch):
    from adrs.archive import open_run
    from evaluator.workload.cache import cache_root

    monkeypatch.setenv("ADRS_CACHE", str(tmp_path / "cache"))
    assert cache_root().stat().st_mode & 0o777 == 0o700
    archive = open_run(tmp_path / "run", create=True)
    archive.close()
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o700
