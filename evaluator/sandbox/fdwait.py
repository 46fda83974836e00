"""Waiting on file descriptors with poll(2): select(2) refuses descriptors numbered 1024 or more.

A harness process can hold that many (a process that received a workload through
``torch.multiprocessing`` keeps one per shared tensor; found so on 2 x H200), and every fd it
opens after those (a worker's control socket, a session's pipes) is then out of select's
range; the launcher and the fork server inherit such numbers. Standard library only: they
import it as a plain module.
"""
from __future__ import annotations

import select


def wait_readable(fd: int, timeout: float) -> bool:
    """Whether ``fd`` has data, or its other end is closed, within ``timeout`` seconds (0: now)."""
    return _wait(fd, select.POLLIN, timeout)


def wait_writable(fd: int, timeout: float) -> bool:
    """Whether ``fd`` takes a write, or its other end is closed, within ``timeout`` seconds."""
    return _wait(fd, select.POLLOUT, timeout)


def ready_to_read(fds: list[int], timeout: float | None) -> list[int]:
    """Those of ``fds`` with data or a closed other end, waiting at most ``timeout`` s (None: until one is)."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return [fd for fd, _ in poller.poll(None if timeout is None else max(0.0, timeout) * 1000.0)]


def _wait(fd: int, events: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, events)
    # POLLHUP and POLLERR come back unasked: like select, an ended pipe counts as ready.
    return bool(poller.poll(max(0.0, timeout) * 1000.0))
