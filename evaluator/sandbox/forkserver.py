"""Fork server: starts sandbox workers by forking a process that has already imported torch.

Run by the parent (``evaluator.sandbox.spawn.ForkServer``) as ``python -s forkserver.py FD``,
with a worker's scrubbed environment. A fresh worker spends ~3 of its ~4 s of start-up
importing torch; this process does that once. Like the launcher, it never imports the
``evaluator`` package (workers import it inside their namespaces, from the read-only bind),
never initialises CUDA and never runs a torch op: neither a CUDA context nor a thread pool
survives a fork.

Per request it forks a child that becomes that worker's launcher. A forked child has one
thread, so it may unshare a user namespace; it runs the launcher's isolation unchanged
(``launcher.isolate_and_run``), and the worker, PID 1 of its namespaces, then runs
``evaluator.sandbox.worker`` in this already-initialised interpreter instead of exec'ing a
new one. What the worker inherits from here is the interpreter and the modules below: this
process holds no secret (its environment is a worker's) and no fd but its own socket, which
the child closes.

Protocol, on a SOCK_SEQPACKET socket: a request is a launch spec (JSON) with five fds:
control, lifeline, stdin, log and a status pipe. On the status pipe this server writes
``pid\\n`` once it forked and ``exitcode\\n`` once it reaped that child, then closes it.
At end of file on the socket (the pool closed, or the parent died) it takes no more requests
and exits once its children are gone; they die with their lifelines anyway.
"""
from __future__ import annotations

import fcntl
import importlib
import json
import os
import resource
import runpy
import signal
import socket
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # siblings as plain modules, as the launcher imports its own
import launcher  # noqa: E402
from fdwait import ready_to_read  # noqa: E402
import preimports  # noqa: E402 - what every worker imports first; its files are bound at the same paths inside

_SIBLINGS = ("launcher", "seccomp_filter", "preimports", "fdwait")  # host-path modules a worker must not keep
_FDS = 5  # a request's fds: control, lifeline, stdin, log, status


def _run_worker(spec: dict, pythonpath: str, level: str) -> None:
    """``launcher.isolate_and_run``'s ``start``: the worker's main, in this interpreter."""
    os.environ.clear()
    os.environ.update(spec["env"], PYTHONPATH=pythonpath, ADRS_SANDBOX_LEVEL=level)
    # The worker's imports resolve as in a fresh interpreter started with this PYTHONPATH; the
    # launcher's own directory (a host path) and every cached finder are dropped.
    rest = [p for p in sys.path if p != HERE]
    sys.path[:] = [p for p in pythonpath.split(os.pathsep) if p] + rest
    for name in _SIBLINGS:
        sys.modules.pop(name, None)
    sys.path_importer_cache.clear()
    importlib.invalidate_caches()
    at = spec["argv"].index("-m") + 1  # the worker's ``python -s -m MODULE ARGS...``
    sys.argv = [spec["argv"][at], *spec["argv"][at + 1:]]
    runpy.run_module(spec["argv"][at], run_name="__main__", alter_sys=True)


def _child(spec: dict, fds: list[int]) -> None:
    """In the forked child: own session, the fds at fixed numbers and no other, then isolate."""
    os.setsid()
    control, lifeline, stdin, log, _status = fds
    if sorted((spec["control_fd"], spec["lifeline_fd"])) != [3, 4]:
        os._exit(launcher.EXIT_REFUSED)  # our own client's bug: it always asks for 3 and 4
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in (stdin, log, log, control, lifeline)]
    targets = (0, 1, 2, spec["control_fd"], spec["lifeline_fd"])  # stdin, the log twice, control, lifeline
    for target, fd in zip(targets, high):
        os.dup2(fd, target)
    # Everything above them: the copies, the server's socket, other workers' status pipes.
    os.closerange(max(targets) + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    os.chdir("/")
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a fresh interpreter
    try:
        launcher.isolate_and_run(spec, _run_worker)
    except launcher.IsolationError as exc:
        launcher.send_message(spec["control_fd"], {"level": "refused", "detail": str(exc)})
    os._exit(launcher.EXIT_REFUSED)


def _write(fd: int, text: str) -> None:
    try:
        os.write(fd, text.encode())
    except OSError:
        pass  # the parent closed its end: it no longer wants to know


def serve(sock: socket.socket) -> None:
    """Fork one child per request; relay each child's pid and exit code on its status pipe."""
    children: dict[int, tuple[int, int]] = {}  # pidfd -> (pid, status pipe)
    accepting = True
    while accepting or children:
        ready = ready_to_read(([sock.fileno()] if accepting else []) + list(children), None)
        for pidfd in [r for r in ready if r in children]:
            pid, status = children.pop(pidfd)
            _, code = os.waitpid(pid, 0)
            _write(status, f"{os.waitstatus_to_exitcode(code)}\n")
            os.close(status)
            os.close(pidfd)
        if sock.fileno() in ready:
            try:
                data, fds, _, _ = socket.recv_fds(sock, 1 << 20, _FDS)
            except OSError:
                data, fds = b"", []
            if not data:
                accepting = False
                for fd in fds:
                    os.close(fd)
                continue
            if len(fds) != _FDS:
                for fd in fds:
                    os.close(fd)
                continue  # malformed: only our own parent writes here, so this is a bug, not an attack
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                sock.close()
                _child(json.loads(data), fds)
            for fd in fds[:-1]:
                os.close(fd)
            _write(fds[-1], f"{pid}\n")
            children[os.pidfd_open(pid)] = (pid, fds[-1])


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the pool ends us (end of file), not a terminal's ^C
    for name in preimports.MODULES:
        importlib.import_module(name)
    serve(sock)


if __name__ == "__main__":
    main()
