"""Slot processes: each local slot's harness in a process of its own, nothing lost when one dies."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from adrs.config import parse_config
from adrs.scheduler import LocalScheduler, make_scheduler
from adrs.scheduler.base import SlotScheduler
from adrs.scheduler.process import ProcessSlot
from conftest import ROOT, sandbox_workers_of
from evaluator.inprocess import score_file
from evaluator.sandbox import IsolationUnavailable, SandboxLimits
from evaluator.workload import at_precision, load_workload, resolve_spec

SEED = ROOT / "seeds" / "sink_window.py"
SPECS = {"search": resolve_spec("tiny"), "heldout": resolve_spec("tiny-heldout")}


def sleeping(seconds: float) -> str:
    """The seed, made to sleep inside its evolve block before it selects anything."""
    code = SEED.read_text()
    return code.replace("# EVOLVE-BLOCK-START\n", f"# EVOLVE-BLOCK-START\nimport time\ntime.sleep({seconds})\n", 1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes: it runs nothing.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@pytest.fixture(scope="module")
def two_processes(tiny_workload):
    with LocalScheduler(lambda which: tiny_workload, 0.1, SandboxLimits(wall_s=30), devices=["cpu", "cpu"],
                        specs=SPECS, spares=1) as sched:
        assert sched.wait_started(120)
        yield sched


def test_slot_processes_score_exactly_outside_the_driver(two_processes, tiny_workload):
    futures = [two_processes.submit(sleeping(3)) for _ in range(2)]
    # While both run, their sandbox workers belong to the slot processes, not to this one.
    assert _wait_for(lambda: sum(len(sandbox_workers_of(s.pid)) for s in two_processes._slots) == 2, 60)
    assert sandbox_workers_of(os.getpid()) == []
    pids = {s.pid for s in two_processes._slots}
    assert len(pids) == 2 and os.getpid() not in pids
    expected = score_file(SEED, tiny_workload, 0.1)
    assert [f.result(timeout=120).combined_score for f in futures] == [expected.combined_score] * 2

    heldout = two_processes.submit(SEED.read_text(), "heldout").result(timeout=120)
    assert heldout.combined_score == score_file(SEED, load_workload("tiny-heldout", progress=False), 0.1).combined_score
    audit = two_processes.submit(SEED.read_text(), "audit").result(timeout=120)
    assert audit.combined_score == score_file(SEED, at_precision(tiny_workload, torch.float64), 0.1).combined_score
    assert audit.workload.endswith("/float64")


def test_a_killed_slot_process_loses_no_job(two_processes, tiny_workload):
    future = two_processes.submit(sleeping(4))
    assert _wait_for(lambda: any(sandbox_workers_of(s.pid) for s in two_processes._slots), 60)
    slot = next(s for s in two_processes._slots if sandbox_workers_of(s.pid))
    old_pid, workers = slot.pid, sandbox_workers_of(slot.pid)
    os.kill(old_pid, signal.SIGKILL)
    report = future.result(timeout=180)
    # Retried on a live slot process: the candidate's true score, not a failure.
    assert report.valid and report.combined_score == score_file(SEED, tiny_workload, 0.1).combined_score
    assert _wait_for(lambda: not any(_alive(p) for p in workers), 20), "the dead slot's sandbox worker outlived it"
    assert _wait_for(lambda: slot.pid != old_pid and _alive(slot.pid), 120), "the slot did not restart its process"


def test_a_silent_slot_process_is_killed_and_its_job_retried(tiny_workload):
    limits = SandboxLimits(wall_s=5, startup_s=20)
    slot = ProcessSlot(0, "cpu", SPECS, 0.1, limits, spares=1, guard_margin_s=1)
    with SlotScheduler([slot]) as sched:
        assert sched.wait_started(120)
        frozen = slot.pid
        future = sched.submit(sleeping(2))
        assert _wait_for(lambda: sandbox_workers_of(frozen), 60), "the candidate never started"
        workers = sandbox_workers_of(frozen)
        os.kill(frozen, signal.SIGSTOP)  # alive, holding its job, answering nothing
        report = future.result(timeout=180)
        assert report.valid and report.combined_score == score_file(SEED, tiny_workload, 0.1).combined_score
        assert slot.pid != frozen and not _alive(frozen)
        assert _wait_for(lambda: not any(_alive(p) for p in workers), 20), "the frozen slot's worker outlived it"


def test_harness_errors_in_a_slot_process_reach_the_caller_as_themselves():
    specs = {"search": SPECS["search"], "heldout": None}
    with LocalScheduler(lambda which: None, 0.1, SandboxLimits(wall_s=30), devices=["cpu"], specs=specs, spares=1) as sched:
        with pytest.raises(ValueError, match="no heldout workload"):
            sched.submit(SEED.read_text(), "heldout").result(timeout=120)
        assert sched.submit(SEED.read_text()).result(timeout=120).valid  # the slot keeps serving
    with LocalScheduler(lambda which: None, 0.1, SandboxLimits(wall_s=30, isolate=False), devices=["cpu"],
                        specs=specs, spares=1) as sched:
        with pytest.raises(IsolationUnavailable):
            sched.submit(SEED.read_text()).result(timeout=120)


def test_slot_processes_and_their_workers_die_with_the_driver(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from adrs.scheduler import LocalScheduler
        from evaluator.sandbox import SandboxLimits
        from evaluator.workload import resolve_spec
        sched = LocalScheduler(lambda w: None, 0.1, SandboxLimits(wall_s=120), devices=["cpu"],
                               specs={{"search": resolve_spec("tiny"), "heldout": None}}, spares=1)
        assert sched.wait_started(120)
        sched.submit({sleeping(100)!r})
        print(sched._slots[0].pid, flush=True)
        time.sleep(600)
    """))
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        slot_pid = int(driver.stdout.readline())
        assert _wait_for(lambda: sandbox_workers_of(slot_pid), 60), "the candidate never started"
        workers = sandbox_workers_of(slot_pid)
        driver.kill()
        driver.wait(10)
        assert _wait_for(lambda: not _alive(slot_pid), 20), "the slot process outlived its driver"
        assert _wait_for(lambda: not any(_alive(p) for p in workers), 20), "a sandbox worker outlived its driver"
    finally:
        driver.kill()


def test_slot_processes_follow_the_config(tiny_workload):
    cfg = parse_config({"workload": "tiny", "evaluation": {"slot_processes": True, "spares": 1}})
    with make_scheduler(cfg, lambda which: tiny_workload) as sched:
        assert sched.processes and all(isinstance(s, ProcessSlot) for s in sched._slots)
        # Scored on the slot's device (a GPU where there is one): compared with the same device in process.
        expected = score_file(SEED, load_workload("tiny", device=sched.devices[0], progress=False), 0.1).combined_score
        assert sched.submit(SEED.read_text()).result(timeout=120).combined_score == pytest.approx(expected, abs=1e-6)
    # Default on a machine with at most one GPU: thread slots, no extra process.
    if torch.cuda.device_count() <= 1:
        with make_scheduler(parse_config({"workload": "tiny", "evaluation": {"spares": 1}}), lambda w: tiny_workload) as sched:
            assert not sched.processes
    with pytest.raises(Exception, match="slot_processes"):
        parse_config({"evaluation": {"slot_processes": "sometimes"}})
