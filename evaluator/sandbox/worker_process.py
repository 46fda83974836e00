"""One sandbox worker process, from the parent's side: started through the launcher (which
isolates it), handed exactly one job, read while it streams its results, then killed and reaped."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from evaluator.errors import IsolationUnavailable
from evaluator.sandbox.fdwait import wait_readable
from evaluator.sandbox.channel import ChannelError, ChannelOverflow, DeadlineIO, ReadAhead
from evaluator.sandbox.isolation import NOBODY, is_root, kill_tree, scrubbed_env
from evaluator.sandbox.limits import SandboxLimits
from evaluator.sandbox.scratch import OverCap, ScratchView
from evaluator.sandbox.spawn import (FORKED_CONTROL_FD, FORKED_LIFELINE_FD, ForkedProcess, ForkServer,
                                     ForkServerGone, start_fresh)
from evaluator.threads import evaluation_threads

_REPO_ROOT = str(Path(__file__).resolve().parents[2])
_READ_CHUNK = 64 * 1024
_MAX_STATUS = 4 * 1024 * 1024
_RESULT_PIPE_BYTES = 8 << 20
_READ_AHEAD_BYTES = 64 << 20  # read but not yet scored: about 200 records of ``default``


class _CappedReader(threading.Thread):
    """Drains a pipe in chunks, keeping at most ``cap`` bytes; sets ``exceeded`` past it."""

    def __init__(self, stream: Any, cap: int) -> None:
        super().__init__(daemon=True)
        self.stream, self.cap = stream, cap
        self.buf = bytearray()
        self.exceeded = threading.Event()

    def run(self) -> None:
        try:
            while chunk := self.stream.read1(_READ_CHUNK):
                room = self.cap - len(self.buf)
                if room > 0:
                    self.buf += chunk[:room]
                if len(chunk) > room:
                    self.exceeded.set()  # keep draining (discarding) so the child never blocks
        except (OSError, ValueError):
            pass

    def text(self) -> str:
        return self.buf.decode("utf-8", "replace")


@dataclass
class WorkerOutcome:
    """How a worker ended; ``status`` is its own (untrusted) account, if it wrote one."""

    returncode: int | None
    timed_out: bool
    log_exceeded: bool
    log: str
    status: dict[str, Any] | None
    elapsed_s: float
    job_sent: bool = True  # False: the worker died or hung before taking the job (our fault)
    channel_error: str | None = None  # the result stream was malformed (the worker's fault)


UNSAFE_ENV = "ADRS_UNSAFE_ALLOW_UNISOLATED"  # "1": run candidates without namespaces (loudly reported)


def _python_paths() -> list[str]:
    """The Python installation and its package directories, as the worker must see them.

    Paths that would expose far more than Python (``/``, or an ancestor of this repository,
    whose ``runs/`` holds run directories) are left out.
    """
    import site

    found = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *site.getsitepackages()}
    found |= {p for p in sys.path if p and ("site-packages" in p or "dist-packages" in p)}
    return sorted(p for p in found | set(_extra_pythonpath()) if _exposable(p))


def _exposable(path: str) -> bool:
    """A directory that may be bound into the sandbox: not ``/``, not this repository or above it."""
    repo = _REPO_ROOT.rstrip("/") + "/"
    return (os.path.isabs(path) and os.path.isdir(path) and path != "/" and path.rstrip("/") != _REPO_ROOT
            and not repo.startswith(path.rstrip("/") + "/"))


def _extra_pythonpath() -> list[str]:
    """The caller's own PYTHONPATH entries (packages installed with --target, say), where exposable."""
    return [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and _exposable(p)]


def launch_spec(limits: SandboxLimits, cuda: bool, control_fd: int, lifeline_fd: int,
                plain_pythonpath: str, prep: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the launcher (``evaluator.sandbox.launcher``) sets up for one worker.

    ``plain_pythonpath``: the worker's PYTHONPATH under the no-isolation opt-out; inside the
    namespaces it is ``pythonpath`` (the bound ``evaluator`` and the caller's package dirs).
    ``prep``: what the worker may do before its job (``{"device": ..., "preload": bool}``).
    """
    return {
        "python": sys.executable,
        "argv": [sys.executable, "-s", "-m", "evaluator.sandbox.worker", str(control_fd), limits.to_json(),
                 json.dumps(prep or {})],
        "control_fd": control_fd, "lifeline_fd": lifeline_fd, "cuda": cuda,
        "python_paths": _python_paths(),
        "lib_binds": [[os.path.join(_REPO_ROOT, "evaluator"), "/sandbox/lib/evaluator"]],
        "plain_pythonpath": plain_pythonpath,
        "pythonpath": os.pathsep.join(["/sandbox/lib", *_extra_pythonpath()]),
        # One tmpfs holds the candidate's scratch and the selections the worker writes back.
        "scratch_bytes": limits.scratch_bytes + limits.output_bytes + (4 << 20),
        "owner": [NOBODY, NOBODY] if is_root() else None,
        "isolate": limits.isolate,
        "allow_unisolated": limits.unsafe_allow_unisolated or os.environ.get(UNSAFE_ENV) == "1",
    }


def forkable(limits: SandboxLimits) -> bool:
    """Whether a fork server may start this worker: only inside namespaces, whose PID namespace
    ends every process the candidate makes. Under the explicit opt-out the parent finds strays by
    the run marker in their environment, which a forked worker cannot carry."""
    return limits.isolate and not (limits.unsafe_allow_unisolated or os.environ.get(UNSAFE_ENV) == "1")


def fork_server_env() -> dict[str, str]:
    """The fork server's environment: a worker's, with the caller's package dirs but not this repository."""
    env = scrubbed_env(os.environ, "forkserver-" + uuid.uuid4().hex, _REPO_ROOT)
    env["PYTHONPATH"] = os.pathsep.join(_extra_pythonpath())
    return env


def worker_env(source: Mapping[str, str], marker: str, cuda: bool) -> dict[str, str]:
    """A worker's environment: ``source`` scrubbed (the launcher sets PYTHONPATH per level), and
    for a GPU worker the CUDA settings it starts with."""
    env = scrubbed_env(source, marker, _REPO_ROOT)
    if cuda:
        env["ADRS_SANDBOX_CUDA"] = "1"
        # One hardware queue instead of CUDA's default 8. Making a context is serialised
        # host-wide by the driver, and every evaluation uses up a worker's: with 8 queues a
        # 2 x H200 host makes ~5 a second however many GPUs it has, with 1 ~8 a second
        # (benchmarks/bench_spare_starts.py). A candidate's kernels go to one stream anyway.
        # A value the user set is kept.
        env.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    return env


class Worker:
    """One sandbox process: started (imports torch), then used for exactly one candidate.

    Started through the launcher, which isolates it (``evaluator.sandbox.launcher``) and
    sends a hello (what isolation is in force, and an fd of the private scratch) over the
    control socket; the worker then says "R" on the same socket once torch is imported.
    """

    def __init__(self, limits: SandboxLimits, cuda: bool = False, device: str | None = None,
                 preload: Path | None = None, server: ForkServer | None = None) -> None:
        """``device``: the slot's device, set before the worker's warm-up; ``preload``: a workload
        inputs file the worker loads onto ``device`` before it says ready (``preloaded`` names it);
        ``server``: a fork server to start from (torch already imported), where the isolation is
        not the explicit opt-out (``forkable``); otherwise, or if it is gone, a fresh interpreter."""
        self.limits = limits
        self.marker = uuid.uuid4().hex
        self.cuda = cuda
        self.device = device
        self.preloaded = preload if preload is not None and device is not None else None
        env = worker_env(os.environ, self.marker, cuda)
        self.control, child_control = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # The lifeline's write end stays here only: if this process dies, the launcher kills the worker.
        lifeline_r, self._lifeline = os.pipe()
        # A spare warms up while other candidates run: on few threads (a GPU slot's evaluation
        # threads; one on a CPU slot), or torch's default of one per core would crowd them out.
        prep = ({"device": device, "preload": self.preloaded is not None,
                 "rehearse": os.environ.get("ADRS_SPARE_REHEARSAL", "1") != "0",
                 "threads": evaluation_threads(device) if cuda else 1} if device is not None else None)
        self.proc: subprocess.Popen | ForkedProcess | None = None
        if server is not None and forkable(limits):
            spec = launch_spec(limits, cuda, FORKED_CONTROL_FD, FORKED_LIFELINE_FD, env["PYTHONPATH"], prep)
            with contextlib.suppress(ForkServerGone):
                self.proc = server.spawn(spec, env, child_control.fileno(), lifeline_r)
        self.forked = self.proc is not None
        self._closed = False
        if self.proc is None:
            spec = launch_spec(limits, cuda, child_control.fileno(), lifeline_r, env["PYTHONPATH"], prep)
            self.proc = start_fresh(spec, env, (child_control.fileno(), lifeline_r))
        child_control.close()
        os.close(lifeline_r)
        self._reader = _CappedReader(self.proc.stdout, limits.log_bytes)
        self._reader.start()
        self.scratch: ScratchView | None = None
        self.isolation: str | None = None  # what the launcher set up, in words
        self._ready: bool | None = None  # None: not known yet
        self._refused: str | None = None  # why the launcher refused to isolate, once it said so
        if self.preloaded is not None and not self._send_preload(self.preloaded):
            # Queued on the control socket (the worker reads it once torch is imported) unless
            # the worker is already gone: wait_ready will say so.
            self.preloaded = None

    @property
    def pgid(self) -> int | None:
        """The launcher's process group (it leads its own); None if a fork server died before forking
        it, and never 0 or 1 (``killpg(0)`` would be our own group)."""
        pid = self.proc.pid
        return pid if pid is not None and pid > 1 else None

    def _kill_group(self) -> None:
        if self.pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pgid, signal.SIGKILL)

    def _receive(self, deadline: float) -> tuple[bytes, list[int]] | None:
        """One message from the control socket before ``deadline``, or None."""
        if not wait_readable(self.control.fileno(), deadline - time.monotonic()):
            return None
        try:
            data, fds, _, _ = socket.recv_fds(self.control, 64 * 1024, 4)
        except OSError:
            return None
        if not data:
            for fd in fds:
                os.close(fd)
            return None
        return data, fds

    def wait_ready(self, timeout: float) -> bool:
        """True once the worker is isolated, has imported everything and waits for its job.

        Raises IsolationUnavailable when the launcher could set up no isolation (and no opt-out
        was given): no worker ran, and none will on this machine. A False before ``timeout``'s end
        is not final: a later call picks up where this one stopped (``WorkerPool`` polls spares
        with ``timeout=0``); a dead worker answers False at once, every time.
        """
        if self._refused is not None:
            raise IsolationUnavailable(self._refused)
        if self._ready is not None:
            return self._ready
        deadline = time.monotonic() + timeout
        if self.isolation is None:
            hello = self._receive(deadline)
            if hello is None:
                return False
            data, fds = hello
            try:
                info = json.loads(data)
                level, detail = info["level"], str(info["detail"])
            except (ValueError, KeyError, TypeError):
                level, detail = "refused", "malformed hello from the launcher"
            if level == "refused" or not fds:
                for fd in fds:
                    os.close(fd)
                self._refused = detail
                raise IsolationUnavailable(detail)
            self.scratch = ScratchView(fds[0], info.get("scratch") if level == "none" else None)
            for fd in fds[1:]:
                os.close(fd)
            self.isolation = detail
        ready = self._receive(deadline)
        if ready is None:
            return False
        self._ready = ready[0] == b"R"
        return self._ready

    def alive(self) -> bool:
        return self.proc.poll() is None

    def preload_late(self, path: Path) -> bool:
        """Have a ready spare that loaded nothing yet load ``path`` onto its device now; it says
        ready again once done (``wait_ready``). False, and nothing sent, for any other worker."""
        if self.preloaded is not None or self.device is None or self._ready is not True or self._closed:
            return False
        if not self._send_preload(path):
            return False  # the worker is gone: the pool drops it
        self.preloaded, self._ready = path, None
        return True

    def _send_preload(self, path: Path) -> bool:
        """Send ``path`` as an fd in a ``preload`` message on the control socket; False if the worker is gone."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            socket.send_fds(self.control, [b"preload"], [fd])
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def send_job(self, job: dict[str, Any], fds: dict[str, int]) -> None:
        """Hand over the job: the files it needs as fds (the worker cannot open our paths), then the JSON."""
        names = sorted(fds)
        socket.send_fds(self.control, [json.dumps(names).encode()], [fds[n] for n in names])
        self.proc.stdin.write((json.dumps(job) + "\n").encode())
        self.proc.stdin.close()

    def run(self, job: dict[str, Any], fds: dict[str, int],
            on_result: Callable[[dict[str, Any], dict[str, torch.Tensor], int], bool]) -> WorkerOutcome:
        """Hand over the job and read the worker's result stream until its status, ``wall_s``,
        its death or a malformed message; then SIGKILL its tree (reaped by ``close``).

        ``on_result(header, tensors, size)`` gets every message before the status, as it comes
        (the caller scores while the worker computes); it returns False to stop reading.
        """
        t0 = time.monotonic()
        timed_out = False
        job_sent = False
        status = None
        channel_error = None
        res_r, res_w = os.pipe()
        reader: ReadAhead | None = None
        widen_pipe(res_w, _RESULT_PIPE_BYTES)
        deadline = t0 + self.limits.wall_s

        def pulse() -> None:  # also while bytes flow: a trickle must not outrun the limits
            if self._reader.exceeded.is_set():
                raise _StreamEnded()
            if time.monotonic() > deadline:
                raise _StreamEnded(timed_out=True)

        def check() -> None:  # nothing to read: also notice the worker's death
            pulse()
            if not self.alive():
                raise _StreamEnded()

        try:
            try:
                if not self.wait_ready(self.limits.startup_s):
                    raise _StartupFailed()
                # The candidate's clock starts as the job goes out: the worker may start on it
                # before send_job returns here.
                t0 = time.monotonic()
                deadline = t0 + self.limits.wall_s
                self.send_job(job, {**fds, "results": res_w})
            finally:
                os.close(res_w)  # the worker holds its own copy: its death reads as end of file here
            job_sent = True
            # Read on a thread while on_result decodes and scores: the worker then seldom waits on a full pipe.
            reader = ReadAhead(DeadlineIO(res_r, None, check, self.limits.output_bytes, pulse), _READ_AHEAD_BYTES, "status")
            while True:
                header, tensors, size = reader.get()
                if "status" in header:
                    status = header["status"] if isinstance(header["status"], dict) else None
                    break
                if not on_result(header, tensors, size):
                    break
        except _StreamEnded as end:
            timed_out = end.timed_out
        except ChannelOverflow as exc:
            channel_error = f"overflow: {exc}"
        except ChannelError as exc:
            channel_error = str(exc)
        except (_StartupFailed, BrokenPipeError, OSError):
            pass  # the worker died or hung before taking the job: a harness failure
        finally:
            # Everything we score is in our memory now: kill at once, reap in close() while we score.
            if reader is not None:
                reader.stop()
            self._kill_group()
            if reader is not None:
                reader.join()  # within 50 ms: stopped, it reads no further
            os.close(res_r)
        return WorkerOutcome(self.proc.poll(), timed_out, self._reader.exceeded.is_set(), "", status,
                             time.monotonic() - t0, job_sent, channel_error)

    def settle(self, outcome: WorkerOutcome) -> WorkerOutcome:
        """``close`` the worker and complete ``outcome`` with its exit code and full log."""
        self.close()
        outcome.returncode = self.proc.returncode
        outcome.log_exceeded = outcome.log_exceeded or self._reader.exceeded.is_set()
        outcome.log = self._reader.text()
        return outcome

    def read_status(self) -> dict[str, Any] | None:
        """The worker's own (untrusted) status.json, if it wrote a well-formed one."""
        if self.scratch is None:
            return None
        try:
            return _parse_status(self.scratch.read("status.json", _MAX_STATUS))
        except OverCap:
            return None

    def close(self) -> None:
        """Kill the worker and every descendant (even those that left the group), reap it.

        The scratch stays readable until ``release``. A second call does nothing: the tree is
        gone, and another ``kill_tree`` would only scan ``/proc`` again.
        """
        if self._closed:
            return
        self._closed = True
        if self.pgid is not None:
            kill_tree(self.pgid, self.marker)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._reader.join(timeout=2)
        if self._lifeline >= 0:
            os.close(self._lifeline)
            self._lifeline = -1
        self.control.close()

    def release(self) -> None:
        """``close`` and free the scratch (its tmpfs, or the host directory of the opt-out)."""
        self.close()
        if self.scratch is not None:
            self.scratch.close()


def widen_pipe(fd: int, size: int) -> None:
    """Give a pipe room for ``size`` bytes (64 KiB by default) so a writer does not wait for the
    reader to drain each 64 KiB: the fast score's result pipe holds several records' messages
    (a record of ``default`` is ~330 KB), a session's pipes a whole call or reply (~150 KB at
    the ``faithful`` preset). Root may go above ``/proc/sys/fs/pipe-max-size``; an ordinary
    user gets at most that (1 MiB by default). The size only changes how far the two sides
    overlap, so a kernel that refuses both keeps the default."""
    for n in (size, min(size, 1 << 20)):
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, n)
            return
        except OSError:
            continue


class _StartupFailed(Exception):
    pass


class _StreamEnded(Exception):
    """The worker stopped answering: it died, printed too much, or ran out of time."""

    def __init__(self, timed_out: bool = False) -> None:
        super().__init__("timed out" if timed_out else "ended")
        self.timed_out = timed_out


def _parse_status(data: bytes | None) -> dict[str, Any] | None:
    if data is None:
        return None
    try:
        status = json.loads(data)
    except ValueError:
        return None
    return status if isinstance(status, dict) else None


