"""Attacks from inside ``masker``, each contained by the OS layer of the sandbox (audit hook off).

Every attack candidate returns a valid selection when it is contained and raises ``BREACH``
when it got through, so containment is proven by a valid score. The candidates run in a
separate driver process started with a secret in its environment (as ``adrs`` would run with
``OPENAI_API_KEY`` set), against targets this test lays out: a world-readable workload-cache
file, run directory, home and another user's file; world-writable folders; a TCP listener, a
unix socket and an abstract unix socket that anyone could reach without the namespaces.

``tests/test_sandbox_unprivileged.py`` runs this file again as an ordinary user.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from conftest import sandbox_workers_of
from evaluator.sandbox.isolation import MARKER_VAR, live_descendants

HOSTILE = Path(__file__).parent / "hostile"
REPO = Path(__file__).resolve().parents[1]
ATTACKS = ("proc_snoop", "read_host_files", "write_escape", "connect_out", "setsid_escape", "fill_scratch",
           "kernel_surface", "inherited_state")

_DRIVER = r"""
import json, sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from evaluator.sandbox import SandboxLimits, WorkerPool, run_candidate
from evaluator.workload import load_workload

full = load_workload("tiny", progress=False)
tiny = replace(full, records=tuple(r for r in full.records if r.layer in (0, full.num_layers - 1)))
limits = SandboxLimits(wall_s=20.0, memory_mb=3072, output_bytes=16 << 20, scratch_bytes=32 << 20, audit_hook=False)
pool = WorkerPool(limits, spares=3) if sys.argv[1] == "forked" else None  # workers forked by its fork server

def one(path):
    run = run_candidate(path, tiny, 0.1, limits=limits, pool=pool)
    r = run.report
    return {"path": path, "valid": r.valid, "category": r.category, "reason": r.reason, "details": r.details,
            "isolation": r.isolation, "pgid": run.pgid, "marker": run.marker}

with ThreadPoolExecutor(3) as ex:
    print(json.dumps(list(ex.map(one, sys.argv[2:]))))
if pool is not None:
    pool.close()
"""


class _Listeners:
    """TCP, unix and abstract unix listeners that count the connections they accept."""

    def __init__(self, folder: Path) -> None:
        self.tcp = socket.socket()
        self.tcp.bind(("127.0.0.1", 0))
        self.unix_path = str(folder / "agent.sock")
        self.unix = socket.socket(socket.AF_UNIX)
        self.unix.bind(self.unix_path)
        os.chmod(self.unix_path, 0o777)  # anyone on the host could connect: only the netns stops it
        self.abstract_name = f"adrs-test-{uuid.uuid4().hex}"
        self.abstract = socket.socket(socket.AF_UNIX)
        self.abstract.bind("\0" + self.abstract_name)
        self.accepted = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._serve, args=(s,), daemon=True)
                         for s in (self.tcp, self.unix, self.abstract)]
        for s, t in zip((self.tcp, self.unix, self.abstract), self._threads):
            s.listen(8)
            s.settimeout(0.1)
            t.start()

    def _serve(self, sock: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(1)
        for s in (self.tcp, self.unix, self.abstract):
            s.close()


def _sleepers(seconds: str) -> list[int]:
    """Host pids of ``sleep <seconds>`` processes."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/cmdline").read_bytes() == b"sleep\0" + seconds.encode() + b"\0":
                    found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.fixture(scope="module", params=["fresh", "forked"])
def attack_results(request):
    # A world-accessible playground: without the mount namespace even ``nobody`` could use it,
    # so a contained attack proves the namespace, not file permissions.
    base = Path(tempfile.mkdtemp(prefix="adrs-attack-", dir="/tmp"))
    os.chmod(base, 0o755)
    folders = {name: base / name for name in ("cache", "runs", "home", "other", "drop")}
    for folder in folders.values():
        folder.mkdir()
        os.chmod(folder, 0o777)
    files = {"cache": folders["cache"] / "sample_0.safetensors", "runs": folders["runs"] / "index.sqlite",
             "home": folders["home"] / "id_rsa", "other": folders["other"] / "secret.txt"}
    for path in files.values():
        path.write_text("private")
        os.chmod(path, 0o666)
    canary = f"sk-canary-{uuid.uuid4().hex}"
    seconds = f"{4000 + uuid.uuid4().int % 1000}.5"
    listeners = _Listeners(base)
    targets = {
        "canary": canary, "read": [str(p) for p in files.values()],
        "write": [str(folders["drop"] / "pwned"), str(folders["runs"] / "pwned"), str(folders["home"] / "pwned")],
        "tamper": [str(files["cache"])], "port": listeners.tcp.getsockname()[1], "unix": listeners.unix_path,
        "abstract": listeners.abstract_name, "seconds": seconds, "give_up_bytes": 512 << 20,
    }
    paths = []
    for name in ATTACKS:
        text = (HOSTILE / f"{name}.py").read_text()
        path = base / f"{name}.py"
        path.write_text(text.replace("TARGETS = {}  # filled in by the test", f"TARGETS = {targets!r}"))
        paths.append(str(path))
    env = {**os.environ, "OPENAI_API_KEY": canary, "ADRS_LLM_API_KEY": canary, "HOME": str(folders["home"])}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("ADRS_CACHE", str(Path.home() / ".cache" / "adrs"))  # the real cache, not the fake home's
    try:
        proc = subprocess.run([sys.executable, "-c", _DRIVER, request.param, *paths], env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = {Path(r["path"]).stem: r for r in json.loads(proc.stdout.strip().splitlines()[-1])}
        time.sleep(0.3)
        yield results, listeners, targets, files, _sleepers(seconds)
    finally:
        listeners.close()
        for pid in _sleepers(seconds):
            os.kill(pid, 9)
        subprocess.run(["rm", "-rf", str(base)], check=False)


@pytest.mark.parametrize("attack", ATTACKS)
def test_attack_is_contained_and_scores(attack, attack_results):
    results = attack_results[0]
    r = results[attack]
    assert r["valid"], f"{attack}: {r['category']}: {r['reason']}\n{r['details']}"
    assert r["isolation"].startswith("namespaces"), r["isolation"]
    assert live_descendants(r["pgid"], r["marker"]) == []


def test_secret_never_reaches_a_report(attack_results):
    results, _, targets, _, _ = attack_results
    assert targets["canary"] not in json.dumps(results)


def test_nothing_written_or_tampered(attack_results):
    _, _, targets, files, _ = attack_results
    assert [t for t in targets["write"] if os.path.exists(t)] == []
    assert all(p.read_text() == "private" for p in files.values())


def test_no_connection_reached_a_listener(attack_results):
    assert attack_results[1].accepted == 0


def test_setsid_descendant_did_not_outlive_the_worker(attack_results):
    assert attack_results[4] == [], "a sleeper started with setsid and an empty environment survived"


_LOOPING_DRIVER = r"""
import sys
from evaluator.sandbox import SandboxLimits, WorkerPool, run_candidate
from evaluator.workload import load_workload

limits = SandboxLimits(wall_s=300.0)
pool = WorkerPool(limits, spares=2) if sys.argv[2] == "forked" else None
run_candidate(sys.argv[1], load_workload("tiny", progress=False), 0.1, limits=limits, pool=pool)
"""


def _marker_of(pid: int) -> str:
    """The sandbox run marker in a process's environment."""
    prefix = f"{MARKER_VAR}=".encode()
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next(v[len(prefix):].decode() for v in env if v.startswith(prefix))


@pytest.mark.parametrize("start", ["fresh", "forked"])
def test_nothing_outlives_a_killed_harness(start):
    """SIGKILL the harness while its candidate loops: the launcher sees its lifeline close and
    kills the worker, whose PID namespace takes every descendant with it. A forked worker
    carries the fork server's marker: the server (and its spare) must end too."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    driver = subprocess.Popen([sys.executable, "-c", _LOOPING_DRIVER, str(HOSTILE / "infinite_loop.py"), start],
                              env=env)
    try:
        deadline = time.monotonic() + 120
        while not (workers := sandbox_workers_of(driver.pid)):
            assert driver.poll() is None, "the driver exited before starting a sandbox worker"
            assert time.monotonic() < deadline, "the driver never handed a job to a sandbox worker"
            time.sleep(0.2)
        pgid, marker = os.getpgid(workers[0]), _marker_of(workers[0])
        time.sleep(3.0)  # the candidate is looping now
        assert live_descendants(pgid, marker), "no sandbox process found"
    finally:
        driver.kill()
        driver.wait()
    deadline = time.monotonic() + 10
    while live_descendants(pgid, marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert live_descendants(pgid, marker) == [], "sandbox processes outlived the harness"
