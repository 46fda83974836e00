"""Local slots served from their own processes: same scores, no lost job, nothing outliving its slot."""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from adrs.config import parse_config
from adrs.scheduler import LocalScheduler, make_scheduler
from adrs.scheduler.local import auto_processes
from conftest import ROOT, sandbox_workers_of
from evaluator.inprocess import score_file
from evaluator.sandbox import SandboxLimits
from evaluator.workload import at_precision
from test_scheduler import SEED, sleeping


@pytest.fixture(scope="module")
def audit_workload(tiny_workload):
    return at_precision(tiny_workload, torch.float64)


@pytest.fixture(scope="module")
def two_proc(tiny_workload, audit_workload):
    source = {"search": tiny_workload, "audit": audit_workload}.__getitem__
    with LocalScheduler(source, 0.1, SandboxLimits(wall_s=60), devices=["cpu", "cpu"], processes=True) as sched:
        yield sched


def _slot_pids(sched: LocalScheduler) -> list[int]:
    return [s.pid for s in sched._slots]


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_automatic_processes_only_with_two_or_more_gpus():
    assert auto_processes(["cuda:0", "cuda:1"])
    assert not auto_processes(["cuda:0"])
    assert not auto_processes(["cpu", "cpu"])


def test_process_slots_score_like_in_process_in_other_processes(two_proc, tiny_workload, audit_workload):
    assert two_proc.processes and two_proc.wait_started(120)
    futures = [two_proc.submit(SEED.read_text()) for _ in range(2)] + [two_proc.submit(SEED.read_text(), "audit")]
    reports = [f.result(timeout=180) for f in futures]
    search = score_file(SEED, tiny_workload, 0.1)
    audit = score_file(SEED, audit_workload, 0.1)
    assert search.error != audit.error  # the second kind really is another workload
    assert [r.combined_score for r in reports] == [search.combined_score] * 2 + [audit.combined_score]
    pids = _slot_pids(two_proc)
    assert len(set(pids)) == 2 and os.getpid() not in pids
    # The candidates ran in the slot processes' sandboxes, not in workers this process started.
    assert not sandbox_workers_of(os.getpid())


def test_slot_process_killed_mid_evaluation_loses_nothing(two_proc, tiny_workload):
    _wait_for(lambda: all(_slot_pids(two_proc)), 120, "both slot processes")
    before = set(_slot_pids(two_proc))
    future = two_proc.submit(sleeping(30))
    owner, worker = _wait_for(
        lambda: next(((p, w[0]) for p in _slot_pids(two_proc) if (w := sandbox_workers_of(p))), None),
        60, "the slow candidate's worker")
    os.kill(owner, signal.SIGKILL)
    # The sandbox worker dies with its slot process instead of running on unsupervised.
    _wait_for(lambda: not os.path.exists(f"/proc/{worker}"), 30, f"worker {worker} to die with its slot process")
    # The job is retried on a live slot (the other, or the same one restarted): its candidate is scored.
    report = future.result(timeout=240)
    assert report.valid and report.combined_score == score_file(SEED, tiny_workload, 0.1).combined_score
    after = _wait_for(lambda: set(_slot_pids(two_proc)) if owner not in _slot_pids(two_proc) else None, 120,
                      "the dead slot process to be replaced")
    assert len(after) == 2 and owner not in after and len(after & before) == 1


def test_sandbox_worker_killed_in_a_slot_process_is_a_crash(two_proc, tiny_workload):
    future = two_proc.submit(sleeping(30))
    worker = _wait_for(lambda: next((w[0] for p in _slot_pids(two_proc) if (w := sandbox_workers_of(p))), None),
                       60, "the slow candidate's worker")
    pids = _slot_pids(two_proc)
    os.kill(worker, signal.SIGKILL)
    report = future.result(timeout=60)
    assert not report.valid and report.category == "crash" and "SIGKILL" in report.reason
    assert _slot_pids(two_proc) == pids  # the slot process itself keeps serving


def test_config_slot_processes_reaches_the_scheduler(tiny_workload):
    config = parse_config({"workload": "tiny", "evaluation": {"slot_processes": True, "timeout_s": 2}})
    sched = make_scheduler(config, lambda which: tiny_workload)
    try:
        assert isinstance(sched, LocalScheduler) and sched.processes
        report = sched.submit((ROOT / "tests" / "hostile" / "sleep_past_timeout.py").read_text()).result(timeout=300)
        assert report.category == "timeout", report.reason
    finally:
        sched.close()
    assert not any(s._process.is_alive() for s in sched._slots)
