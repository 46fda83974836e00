"""Starting a worker's launcher: as a fresh interpreter, or forked by a fork server.

A fresh interpreter (``python -I -S launcher.py``) imports torch in every worker, ~3 s of
CPU. A ``ForkServer`` (``evaluator.sandbox.forkserver``) imports it once and forks a launcher
per worker; the isolation is the same (the launcher's own code runs in the forked child).
Either way the parent gets a process handle with the part of ``subprocess.Popen`` a ``Worker``
uses: ``pid`` (its process group), ``stdin``, ``stdout``, ``poll``, ``wait``, ``returncode``.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

from evaluator.sandbox.fdwait import wait_readable

_HERE = Path(__file__).resolve().parent
_LAUNCHER = str(_HERE / "launcher.py")
_SERVER = str(_HERE / "forkserver.py")
# Where a forked launcher finds its control socket and lifeline (the worker's argv names the first).
FORKED_CONTROL_FD, FORKED_LIFELINE_FD = 3, 4
_PID_WAIT_S = 120.0  # the server imports torch before its first fork: seconds on a loaded machine


class ForkServerGone(Exception):
    """The fork server is not running (it failed to start, or died): start workers fresh."""


def start_fresh(spec: dict[str, Any], env: dict[str, str], pass_fds: tuple[int, ...]) -> subprocess.Popen:
    """The launcher as a new interpreter, leading its own process group."""
    return subprocess.Popen(
        [sys.executable, "-I", "-S", _LAUNCHER, json.dumps(spec)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=env, cwd="/", start_new_session=True, pass_fds=pass_fds, close_fds=True,
    )


class ForkedProcess:
    """A launcher forked by the fork server, seen from the parent.

    Its pid and exit code come on a status pipe the server writes (it, not we, is the parent).
    Should the server die first, the pipe ends without them: a launcher never forked reads as
    killed (its pid is None: nothing to signal); one that was forked is watched through a pidfd
    opened when its pid arrived, and reads as killed once it is gone (its exit code went with
    the server).
    """

    def __init__(self, status_fd: int, stdin_fd: int, log_fd: int) -> None:
        self._status: int | None = status_fd
        self._pidfd: int | None = None
        self._lines: list[str] = []
        self._partial = b""
        self.stdin: BinaryIO = os.fdopen(stdin_fd, "wb")
        self.stdout: BinaryIO = os.fdopen(log_fd, "rb")
        self.returncode: int | None = None

    def _read(self, timeout: float) -> None:
        """Take what the status pipe (or, once the server is gone, the pidfd) says, waiting at
        most ``timeout`` for it."""
        watched = self._status if self._status is not None else self._pidfd
        if watched is None or self.returncode is not None:
            return
        if not wait_readable(watched, timeout):
            return
        if watched == self._pidfd:
            self._set_returncode(-signal.SIGKILL)  # gone, after the server: its exit code went with it
            return
        chunk = os.read(watched, 256)
        if not chunk:
            os.close(watched)
            self._status = None
            if self._pidfd is None:
                self._set_returncode(-signal.SIGKILL)  # never forked, or gone before we could watch it
            return
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        self._lines += [line.decode() for line in lines]
        if len(self._lines) >= 2:
            self._set_returncode(int(self._lines[1]))
        elif self._lines and self._pidfd is None:
            with contextlib.suppress(OSError):  # gone already: the server's exit code is on its way
                self._pidfd = os.pidfd_open(int(self._lines[0]))

    def _set_returncode(self, code: int) -> None:
        self.returncode = code
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    @property
    def pid(self) -> int | None:
        """The launcher's pid, which leads its process group; None if the server died before forking it."""
        deadline = time.monotonic() + _PID_WAIT_S
        while not self._lines and self._status is not None and time.monotonic() < deadline:
            self._read(deadline - time.monotonic())
        return int(self._lines[0]) if self._lines else None

    def poll(self) -> int | None:
        self._read(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = 3600.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired("forked launcher", timeout or 0)
            self._read(left)
        return self.returncode


class ForkServer:
    """One fork server process (``evaluator.sandbox.forkserver``) and the socket to it.

    ``env``: its environment, a worker's scrubbed one (it holds no secret, and workers inherit
    its memory). Requests are queued while it imports torch, so ``spawn`` never waits for it.
    """

    def __init__(self, env: dict[str, str]) -> None:
        self._sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(
            [sys.executable, "-s", _SERVER, str(child.fileno())], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, env=env, cwd="/", start_new_session=True,
            pass_fds=(child.fileno(),), close_fds=True,
        )
        child.close()
        self._lock = threading.Lock()

    def spawn(self, spec: dict[str, Any], env: dict[str, str], control_fd: int, lifeline_fd: int) -> ForkedProcess:
        """Fork a launcher for ``spec``; raises ForkServerGone if the server is not running.

        The spec must name ``FORKED_CONTROL_FD``/``FORKED_LIFELINE_FD`` (where the child's copies land).
        """
        if (spec["control_fd"], spec["lifeline_fd"]) != (FORKED_CONTROL_FD, FORKED_LIFELINE_FD):
            raise ValueError("a forked launcher's spec must name the fixed control and lifeline fds")
        stdin_r, stdin_w = os.pipe()
        log_r, log_w = os.pipe()
        status_r, status_w = os.pipe()
        try:
            with self._lock:
                if self.proc.poll() is not None:
                    raise ForkServerGone(f"the fork server exited with {self.proc.returncode}")
                socket.send_fds(self._sock, [json.dumps({**spec, "env": env}).encode()],
                                [control_fd, lifeline_fd, stdin_r, log_w, status_w])
        except (OSError, ForkServerGone) as exc:
            for fd in (stdin_w, log_r, status_r):
                os.close(fd)
            raise ForkServerGone(str(exc)) from None
        finally:
            for fd in (stdin_r, log_w, status_w):
                os.close(fd)
        return ForkedProcess(status_r, stdin_w, log_r)

    def close(self) -> None:
        """End of file for the server: it takes no more requests and exits once its children have."""
        self._sock.close()
        try:
            self.proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass  # workers still running (their lifelines end them); it exits after them
