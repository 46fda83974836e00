"""A session's shared device block (``evaluator.sandbox.devshare``): exact, contained, optional.

GPU only: the block is CUDA driver memory. Every call here runs through a real sandbox worker
on a real session; the in-process selector and the pipes-only session are the references.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from evaluator.sandbox import SandboxLimits
from evaluator.faithful.score import CandidateFailure
from evaluator.sandbox.session import SHARED_ENV, SandboxSession, shared_sizes

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ROOT / "seeds"

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ROWS, HEADS, KV_HEADS, DIM, PREFIX, STEPS = 4, 6, 2, 16, 300, 4

PER_KV_HEAD = ROOT / "tests" / "candidates" / "per_kv_head.py"

# Finds the worker's mapping of the block and fills all of it (input and output regions) with
# NaN before answering like sink_window: the parent reads nothing back but what the worker
# writes after the masker returns, so the score must equal sink_window's in process.
SCRIBBLER = """import gc, torch
from evaluator.sandbox.devshare import SharedBlock

def masker(inp):
    for obj in gc.get_objects():
        if type(obj) is SharedBlock:
            obj.bytes().view(torch.float32).fill_(float("nan"))
    return honest(inp)
"""

# Unmaps the worker's view of the block: the worker's own write of the selection then faults.
UNMAPPER = """import gc
from evaluator.sandbox.devshare import SharedBlock

def masker(inp):
    for obj in gc.get_objects():
        if type(obj) is SharedBlock:
            obj.close()
    return honest(inp)
"""


def _calls(device: torch.device) -> list[tuple]:
    """A small decode's calls: a 3-token question (too big for the block: pipes) then single tokens."""
    from evaluator.faithful.decode import CallInputs

    gen = torch.Generator().manual_seed(0)
    prefix = torch.randn(ROWS, KV_HEADS, PREFIX, DIM, generator=gen)
    keys = [torch.zeros(ROWS, KV_HEADS, PREFIX + 3 + STEPS, DIM, device=device) for _ in range(2)]  # per layer
    for k in keys:
        k[:, :, :PREFIX] = prefix.to(device)
    calls, start = [], PREFIX
    for step in range(STEPS + 1):
        q_len = 3 if step == 0 else 1
        for layer in range(2):
            q = torch.randn(ROWS, HEADS, q_len, DIM, generator=gen).to(device)
            new = torch.randn(ROWS, KV_HEADS, q_len, DIM, generator=gen).to(device)
            keys[layer][:, :, start:start + q_len] = new
            pos = torch.arange(start, start + q_len, device=device)
            calls.append(CallInputs(layer, 2, step, q, keys[layer][:, :, :start + q_len].clone(), new, start, pos, 0.25))
        start += q_len
    return calls


def _session_selections(path: Path, calls: list, shared: bool, limits: SandboxLimits | None = None) -> tuple[list, int]:
    """Every call's validated weights through a session (with or without the block), and how many
    came back through the block."""
    from evaluator.faithful.score import session_selector

    from evaluator.faithful.score import write_prefix_file

    max_len = calls[-1].keys.shape[2]
    prefix = write_prefix_file([calls[0].keys[:, :, :PREFIX]] * 2)  # both layers' keys before the first call
    setup = {"prefix": str(prefix), "row_groups": 1, "max_len": max_len,
             "shared": shared_sizes(ROWS, HEADS, KV_HEADS, DIM, max_len)}
    old = os.environ.pop(SHARED_ENV, None)
    if not shared:
        os.environ[SHARED_ENV] = "0"
    try:
        with SandboxSession(path, calls[0].queries.device, 0.1, 0, setup, limits) as session:
            select = session_selector(session)
            out = [select(c) for c in calls]
            return out, session.shared_calls
    finally:
        prefix.unlink()
        os.environ.pop(SHARED_ENV, None)
        if old is not None:
            os.environ[SHARED_ENV] = old


def _in_process(path: Path, calls: list) -> list:
    from evaluator.candidate import load_masker
    from evaluator.faithful.score import in_process_selector

    select = in_process_selector(load_masker(path), 0.1, 0)
    return [select(c) for c in calls]


def _candidate(tmp_path: Path, name: str, source: str) -> Path:
    """``source``, which may call ``honest``: sink_window's masker, renamed (a sandboxed candidate is one file)."""
    honest = (SEEDS / "sink_window.py").read_text().replace("def masker(", "def honest(")
    path = tmp_path / name
    path.write_text(honest + "\n" + source)
    return path


def test_a_block_is_shared_with_another_process():
    """The parent's writes reach the other process's mapping and back, through an fd alone."""
    from evaluator.sandbox import devshare

    device = torch.device("cuda", torch.cuda.current_device())
    block = devshare.allocate(3 << 20, device)
    assert block is not None and block.size >= 3 << 20 and block.fd is not None
    block.tensor(0, torch.float32, (4,)).copy_(torch.arange(4.0, device=device))
    torch.cuda.synchronize()
    child = textwrap.dedent(f"""
        import sys, torch
        from evaluator.sandbox import devshare
        b = devshare.attach({block.fd}, {block.size}, "{device}")
        got = b.tensor(0, torch.float32, (4,)).tolist()
        b.tensor(1024, torch.int64, (2,)).fill_(7)
        torch.cuda.synchronize()
        print(got)
    """)
    done = subprocess.run([sys.executable, "-c", child], pass_fds=[block.fd], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[0.0, 1.0, 2.0, 3.0]"
    assert block.tensor(1024, torch.int64, (2,)).tolist() == [7, 7]  # the child has exited: our mapping stands
    block.close()


@pytest.mark.parametrize("seed", ["sink_window", "oracle_topk", "vattention", "per_kv_head"])
def test_sessions_through_the_block_equal_pipes_and_in_process(tmp_path, seed):
    path = PER_KV_HEAD if seed == "per_kv_head" else SEEDS / f"{seed}.py"
    calls = _calls(torch.device("cuda", torch.cuda.current_device()))
    via_block, n_shared = _session_selections(path, calls, shared=True)
    via_pipes, n_pipes = _session_selections(path, calls, shared=False)
    expected = _in_process(path, calls)
    assert n_shared == len(calls) - 2 and n_pipes == 0  # the question's two calls did not fit the block
    for got, pipes, want in zip(via_block, via_pipes, expected):
        assert torch.equal(got, want) and torch.equal(pipes, want)


def test_a_candidate_that_scribbles_on_the_block_scores_as_the_honest_one(tmp_path):
    calls = _calls(torch.device("cuda", torch.cuda.current_device()))
    got, n_shared = _session_selections(_candidate(tmp_path, "scribbler.py", SCRIBBLER), calls, shared=True)
    expected = _in_process(SEEDS / "sink_window.py", calls)
    assert n_shared == len(calls) - 2
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_a_candidate_that_unmaps_the_block_fails_alone(tmp_path):
    calls = _calls(torch.device("cuda", torch.cuda.current_device()))
    with pytest.raises(CandidateFailure) as failure:
        _session_selections(_candidate(tmp_path, "unmapper.py", UNMAPPER), calls, shared=True,
                            limits=SandboxLimits(wall_s=60))
    assert failure.value.category in ("exception", "crash"), failure.value.reason
    # The parent's own mapping and context are intact: the next session scores exactly.
    got, _ = _session_selections(SEEDS / "sink_window.py", calls, shared=True)
    assert all(torch.equal(a, b) for a, b in zip(got, _in_process(SEEDS / "sink_window.py", calls)))
