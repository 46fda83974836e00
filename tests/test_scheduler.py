"""The evaluation scheduler: parallel local slots, bounded retries, nothing dropped, same limits."""
from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import Future

import pytest
import torch

from adrs.config import parse_config
from adrs.evaluate import CodeScorer
from adrs.scheduler import LocalScheduler, local_devices, make_scheduler
from adrs.scheduler.local import local_spares
from adrs.scheduler.base import Slot, SlotScheduler, Which, WorkerLost
from conftest import ROOT, sandbox_workers_of
from evaluator.inprocess import score_file
from evaluator.sandbox import SandboxLimits, auto_spares
from evaluator.scoring import ScoreReport

SEED = ROOT / "seeds" / "sink_window.py"
SLEEP_S = 3.0


def sleeping(seconds: float) -> str:
    """The seed, made to sleep inside its evolve block before it selects anything."""
    code = SEED.read_text()
    return code.replace("# EVOLVE-BLOCK-START\n", f"# EVOLVE-BLOCK-START\nimport time\ntime.sleep({seconds})\n", 1)


@pytest.fixture(scope="module")
def two_cpu(tiny_workload):
    with LocalScheduler(lambda which: tiny_workload, 0.1, SandboxLimits(wall_s=30), devices=["cpu", "cpu"]) as sched:
        yield sched


def _timed(future: "Future[ScoreReport]") -> list[float]:
    """[end]: filled in when the future resolves (a shared 2-core box makes durations useless)."""
    end: list[float] = []
    future.add_done_callback(lambda f: end.append(time.perf_counter()))
    return end


def test_two_slots_evaluate_at_the_same_time(two_cpu, tiny_workload):
    futures = [two_cpu.submit(sleeping(SLEEP_S)) for _ in range(2)]
    ends = [_timed(f) for f in futures]
    reports = [f.result(timeout=120) for f in futures]
    expected = score_file(SEED, tiny_workload, 0.1)
    assert all(r.valid and r.combined_score == expected.combined_score for r in reports)
    # Each report's wall_s spans its whole evaluation: the two spans overlap only if they ran
    # at the same time (one after the other, the second would start after the first ended).
    (a0, a1), (b0, b1) = [(end[0] - r.wall_s, end[0]) for end, r in zip(ends, reports)]
    overlap = min(a1, b1) - max(a0, b0)
    assert overlap > SLEEP_S / 2, f"evaluations overlapped by {overlap:.2f} s only"


def test_worker_killed_mid_evaluation_is_reported_not_dropped(two_cpu, tiny_workload):
    future = two_cpu.submit(sleeping(20))
    deadline = time.monotonic() + 20
    while not (pids := sandbox_workers_of(os.getpid())) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(pids) == 1, "the slow candidate's worker never started"
    os.kill(pids[0], signal.SIGKILL)
    report = future.result(timeout=30)
    assert not report.valid and report.category == "crash" and "SIGKILL" in report.reason
    # The slot that lost its worker keeps serving.
    after = [two_cpu.submit(SEED.read_text()) for _ in range(2)]
    expected = score_file(SEED, tiny_workload, 0.1).combined_score
    assert [f.result(timeout=60).combined_score for f in after] == [expected, expected]


def test_timeout_still_fails_as_timeout(tiny_workload):
    code = (ROOT / "tests" / "hostile" / "sleep_past_timeout.py").read_text()
    with LocalScheduler(lambda which: tiny_workload, 0.1, SandboxLimits(wall_s=2), devices=["cpu"]) as sched:
        report = sched.submit(code).result(timeout=60)
    assert report.category == "timeout", report.reason


def test_no_isolation_stops_the_caller_instead_of_failing_candidates(tiny_workload):
    """Where no sandbox can be set up, the run stops with the reason; no candidate is scored as failed."""
    from evaluator.sandbox import IsolationUnavailable

    with LocalScheduler(lambda which: tiny_workload, 0.1, SandboxLimits(wall_s=30, isolate=False), devices=["cpu"]) as sched:
        with pytest.raises(IsolationUnavailable):
            sched.submit(SEED.read_text()).result(timeout=120)


class BarrierSlot(Slot):
    """Returns only once ``parties`` slots are evaluating at the same moment."""

    def __init__(self, name: str, barrier: threading.Barrier) -> None:
        self.name, self.barrier = name, barrier

    def open(self) -> None:
        pass

    def evaluate(self, code: str, which: Which) -> ScoreReport:
        self.barrier.wait(timeout=10)  # BrokenBarrierError unless the other slot is busy too
        return ScoreReport(valid=True, combined_score=1.0, workload=which)

    def close(self) -> None:
        pass


def test_codescorer_calls_from_two_threads_run_on_two_slots(tiny_workload):
    cfg = parse_config({"workload": "tiny", "heldout_workload": "tiny-heldout"})
    barrier = threading.Barrier(2)
    sched = SlotScheduler([BarrierSlot("a", barrier), BarrierSlot("b", barrier)])
    scorer = CodeScorer(cfg, tiny_workload, _scheduler=sched)
    reports: list[ScoreReport] = []
    threads = [threading.Thread(target=lambda h=h: reports.append(scorer.score("x", heldout=h))) for h in (False, True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    scorer.close()
    assert sorted(r.workload for r in reports) == ["heldout", "search"]
    with pytest.raises(ValueError, match="held-out"):
        CodeScorer(cfg.model_copy(update={"heldout_workload": None}), tiny_workload).score("x", heldout=True)


def test_make_scheduler_follows_the_config(tiny_workload):
    cfg = parse_config({"workload": "tiny", "evaluation": {"workers": 2, "spares": 2}})
    with make_scheduler(cfg, lambda which: tiny_workload) as sched:
        assert isinstance(sched, LocalScheduler) and sched.devices == local_devices(2) and sched.slots == len(sched.devices)
        assert sched.wait_started(30) and sched.spares == 2
        assert sched.submit(SEED.read_text()).result(timeout=120).valid  # its slot's pool is warm again after it
        assert all(len(slot._pool.waiting) == 2 for slot in sched._slots if slot._pool is not None)
    with pytest.raises(Exception, match="executor"):
        parse_config({"evaluation": {"executor": "slurm"}})
    with pytest.raises(Exception, match="workers"):
        parse_config({"evaluation": {"workers": 0}})
    with pytest.raises(Exception, match="spares"):
        parse_config({"evaluation": {"spares": 0}})
    with pytest.raises(Exception, match="did you mean 'spares'"):
        parse_config({"evaluation": {"spare": 2}})
    assert parse_config({"evaluation": {"spares": None}}).evaluation.spares is None


def test_automatic_spares_hide_start_up_on_gpus_within_cores_and_gpu_memory(two_cpu):
    """null spares: 1 on CPU slots and small machines; on GPUs up to 8, at most half the cores
    over all slots and a fifth of the GPU's memory."""
    assert auto_spares(False, 1, cores=64) == 1 and auto_spares(True, 1, cores=4) == 1
    assert auto_spares(True, 2, cores=32) == 8 and auto_spares(True, 8, cores=32) == 2
    assert auto_spares(True, 2, cores=32, gpu_bytes=141 << 30) == 8 and auto_spares(True, 1, cores=32, gpu_bytes=24 << 30) == 2
    assert auto_spares(True, 16, cores=16, gpu_bytes=8 << 30) == 1
    assert two_cpu.spares == local_spares(["cpu", "cpu"]) == 1


# ---------------------------------------------------------------- retries, with stand-in slots
class FakeSlot(Slot):
    """Loses its worker on the first ``losses`` evaluations; may refuse to recover."""

    def __init__(self, name: str, losses: int, recovers: bool = True, delay: float = 0.0) -> None:
        self.name, self.losses, self.recovers, self.delay = name, losses, recovers, delay
        self.calls = 0
        self.closed = False

    def open(self) -> None:
        pass

    def evaluate(self, code: str, which: Which) -> ScoreReport:
        self.calls += 1
        time.sleep(self.delay)
        if self.calls <= self.losses:
            raise WorkerLost(f"lost #{self.calls}")
        return ScoreReport(valid=True, combined_score=-float(len(code)), workload=f"{self.name}:{which}")

    def recover(self) -> bool:
        return self.recovers

    def close(self) -> None:
        self.closed = True


def test_lost_worker_is_retried_up_to_the_bound():
    flaky = FakeSlot("flaky", losses=2)
    with SlotScheduler([flaky], max_attempts=3) as sched:
        report = sched.submit("abc").result(timeout=5)
    assert report.valid and report.combined_score == -3 and flaky.calls == 3 and flaky.closed

    hopeless = FakeSlot("hopeless", losses=10)
    with SlotScheduler([hopeless], max_attempts=3) as sched:
        report = sched.submit("abc").result(timeout=5)
        assert not report.valid and report.category == "worker_lost"
        assert report.details.count("hopeless: lost #") == 3 and hopeless.calls == 3


def test_a_slot_that_dies_for_good_hands_its_job_to_another():
    dead = FakeSlot("dead", losses=1, recovers=False)
    good = FakeSlot("good", losses=0, delay=0.2)
    with SlotScheduler([dead, good], max_attempts=3) as sched:
        futures = [sched.submit("x" * n) for n in range(1, 5)]
        reports = [f.result(timeout=10) for f in futures]
    assert all(r.valid for r in reports) and dead.calls == 1
    assert sorted(r.combined_score for r in reports) == [-4, -3, -2, -1]


def test_when_every_slot_is_gone_queued_and_new_jobs_fail_as_worker_lost():
    only = FakeSlot("only", losses=1, recovers=False, delay=0.2)
    with SlotScheduler([only], max_attempts=3) as sched:
        futures = [sched.submit("a"), sched.submit("b")]
        reports = [f.result(timeout=10) for f in futures]
        assert [r.category for r in reports] == ["worker_lost", "worker_lost"]
        assert sched.submit("c").result(timeout=1).category == "worker_lost"


def test_checks_go_ahead_of_queued_search_jobs():
    """A commit waits on its audit and held-out scores: they must not queue behind the search jobs
    the loop launched meanwhile (kinds keep their own first-come order)."""
    started = threading.Event()
    release = threading.Event()

    class Gated(FakeSlot):
        def __init__(self) -> None:
            super().__init__("gated", 0)
            self.order: list[tuple[str, Which]] = []

        def evaluate(self, code: str, which: Which) -> ScoreReport:
            self.order.append((code, which))
            started.set()
            release.wait(10)
            return super().evaluate(code, which)

    slot = Gated()
    with SlotScheduler([slot]) as sched:
        first = sched.submit("running")
        assert started.wait(10)
        futures = [sched.submit("s1"), sched.submit("a1", "audit"), sched.submit("s2"), sched.submit("h1", "heldout"),
                   sched.submit("a2", "audit")]
        release.set()
        assert all(f.result(timeout=10).valid for f in [first, *futures])
    assert [code for code, _ in slot.order] == ["running", "a1", "h1", "a2", "s1", "s2"]


def test_a_harness_error_reaches_the_caller():
    class Broken(FakeSlot):
        def evaluate(self, code: str, which: Which) -> ScoreReport:
            raise RuntimeError("harness bug")

    with SlotScheduler([Broken("b", 0)]) as sched:
        future: Future = sched.submit("x")
        with pytest.raises(RuntimeError, match="harness bug"):
            future.result(timeout=5)
        with pytest.raises(ValueError):
            sched.submit("x", which="train")  # type: ignore[arg-type]


def test_a_worker_that_fails_to_start_is_retried(tiny_workload, monkeypatch):
    import adrs.scheduler.host as host

    real = host.run_candidate
    calls: list[int] = []

    def flaky_start(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            from evaluator.sandbox import SandboxRun

            return SandboxRun(ScoreReport.failure("harness", "the sandbox worker failed to start (no candidate code ran)"))
        return real(*args, **kwargs)

    monkeypatch.setattr(host, "run_candidate", flaky_start)
    cfg = parse_config({"workload": "tiny", "heldout_workload": None, "evaluation": {"workers": 1}})
    with make_scheduler(cfg, lambda which: tiny_workload) as sched:
        report = sched.submit(SEED.read_text()).result(timeout=60)
    assert report.valid and len(calls) == 2


def test_wait_started_tells_a_scheduler_whose_slots_cannot_start():
    class NoStart(FakeSlot):
        def open(self) -> None:
            raise OSError("no such device")

    with SlotScheduler([NoStart("n", 0)]) as sched:
        assert sched.wait_started(5) is False
        assert sched.submit("x").result(timeout=1).category == "worker_lost"
    with SlotScheduler([NoStart("n", 0), FakeSlot("ok", 0)]) as sched:
        assert sched.wait_started(5) is True
        assert sched.submit("x").result(timeout=5).valid


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_one_slot_per_gpu_each_scoring_on_its_own_gpu(tiny_workload, processes):
    from evaluator.workload import load_workload, resolve_spec

    devices = local_devices()
    assert devices == [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    specs = {"search": resolve_spec("tiny"), "heldout": None} if processes else None
    with LocalScheduler(lambda which: tiny_workload, 0.1, SandboxLimits(), devices=devices, specs=specs) as sched:
        futures = [sched.submit(SEED.read_text()) for _ in range(2 * len(devices))]
        reports = [f.result(timeout=300) for f in futures]
    expected = score_file(SEED, load_workload("tiny", device="cuda:0", progress=False), 0.1).combined_score
    assert all(r.valid and r.combined_score == pytest.approx(expected, abs=1e-6) for r in reports)
