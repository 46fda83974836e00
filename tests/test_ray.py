"""The Ray backend against a real Ray cluster that this module starts on loopback (CPU only)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from adrs.config import parse_config  # noqa: E402
from adrs.scheduler import LocalScheduler, make_scheduler  # noqa: E402
from conftest import ROOT, sandbox_workers_of  # noqa: E402
from evaluator.sandbox import SandboxLimits  # noqa: E402

SEED = ROOT / "seeds" / "sink_window.py"
HOSTILE = ROOT / "tests" / "hostile"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"Ray's GCS did not open port {port} in {timeout:g} s")


def _session_members(sid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # not a process, or one that just exited
        if fields[3] == str(sid) and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _kill_session(sid: int, timeout: float = 10.0) -> None:
    """SIGKILL every process of session ``sid`` until none is left (or ``timeout``)."""
    deadline = time.monotonic() + timeout
    while (members := _session_members(sid)) and time.monotonic() < deadline:
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    assert not _session_members(sid), "Ray processes survived the teardown"


@pytest.fixture(scope="module")
def ray_address():
    """A one-node cluster with no GPU, in its own session so teardown kills it whole.

    3 CPUs: the module's two-actor scheduler holds 2 until the module ends, and the last test
    needs 1 more. (A CPU here is a Ray resource count, not a core.)
    """
    port = _free_port()
    # Short path: Ray puts unix sockets under it, and those are limited to ~100 characters.
    temp = tempfile.mkdtemp(prefix="adrs-ray-", dir="/tmp")
    log = open(Path(temp) / "ray-start.log", "wb")
    cmd = [sys.executable, "-c", "from ray.scripts.scripts import main; main()", "start", "--head", "--block",
           "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=3", "--num-gpus=0",
           "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_port(port, proc, 60)
        yield f"127.0.0.1:{port}"
    finally:
        if ray.is_initialized():
            ray.shutdown()
        # Our own session only: SIGKILL skips Ray's 30 s drain, and no other Ray is touched.
        # Ray gives each worker its own process group, so the whole session is swept.
        _kill_session(proc.pid)
        proc.wait(timeout=30)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _config(address: str, **evaluation):
    return parse_config({"workload": "tiny", "heldout_workload": "tiny-heldout",
                         "evaluation": {"executor": "ray", "ray_address": address, **evaluation}})


def _sleeping(seconds: float) -> str:
    code = SEED.read_text()
    return code.replace("# EVOLVE-BLOCK-START\n", f"# EVOLVE-BLOCK-START\nimport time\ntime.sleep({seconds})\n", 1)


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaps counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def two_actors(ray_address):
    """Two CPU actors; the scheduler connects to the cluster itself, as `adrs run` does."""
    with make_scheduler(_config(ray_address, workers=2, max_attempts=2), workloads=lambda which: None) as sched:
        yield sched


def test_ray_scores_equal_local_scores(two_actors, tiny_workload):
    from evaluator.workload import load_workload

    jobs = [(SEED.read_text(), "search"), (SEED.read_text(), "heldout"), ((HOSTILE / "nan_weights.py").read_text(), "search")]
    futures = [two_actors.submit(c, w) for c, w in jobs]
    heldout = load_workload("tiny-heldout", progress=False)
    with LocalScheduler(lambda w: tiny_workload if w == "search" else heldout, 0.1, SandboxLimits(), devices=["cpu"]) as local:
        here = [local.submit(c, w).result(timeout=120) for c, w in jobs]
    remote = [f.result(timeout=180) for f in futures]
    assert [r.valid for r in remote] == [True, True, False]
    assert remote[2].category == "invalid" and "finite" in remote[2].reason.lower()
    assert remote[0].workload == tiny_workload.label and remote[1].workload == heldout.label
    for a, b in zip(remote, here):
        a.wall_s = b.wall_s = 0.0
        assert a.to_dict() == b.to_dict()
    info = two_actors.worker_info()
    assert two_actors.slots == 2 and len({i["pid"] for i in info}) == 2
    assert all(i["device"] == "cpu" and i["pid"] != os.getpid() for i in info)


def test_actor_killed_mid_evaluation_is_retried(two_actors):
    sched = two_actors
    pids = _wait(lambda: [i["pid"] for i in sched.worker_info()] if all(sched.worker_info()) else None, 60, "actors")
    futures = [sched.submit(_sleeping(3)) for _ in range(2)]
    victim = pids[0]
    _wait(lambda: sandbox_workers_of(victim), 60, "an evaluation on the first actor")
    os.kill(victim, signal.SIGKILL)
    reports = [f.result(timeout=180) for f in futures]
    assert all(r.valid for r in reports), [r.reason for r in reports]
    assert reports[0].combined_score == reports[1].combined_score
    # Ray restarts the actor in place of the killed one, and the slot takes it up (the other
    # actor may have finished the retried job before that).
    _wait(lambda: sched.worker_info()[0]["pid"] not in (victim, None), 60, "the restarted actor")


def test_lost_actor_without_retries_left_is_a_worker_lost_failure(ray_address):
    with make_scheduler(_config(ray_address, workers=1, max_attempts=1), workloads=lambda which: None) as sched:
        pid = _wait(lambda: sched.worker_info()[0].get("pid"), 60, "the actor")
        future = sched.submit(_sleeping(60))
        orphan = _wait(lambda: sandbox_workers_of(pid), 60, "the evaluation")[0]
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        report = future.result(timeout=60)
        assert report.category == "worker_lost" and "ray-0" in report.details
        assert time.monotonic() - t0 < 30, "the loss was not noticed promptly"
        new_pid = _wait(lambda: (p := sched.worker_info()[0].get("pid")) != pid and p, 60, "the restarted actor")
        # The restarted actor killed the sandbox worker its predecessor left running.
        assert new_pid != pid and not _alive(orphan)
