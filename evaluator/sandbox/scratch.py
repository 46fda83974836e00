"""The parent's read-only view of a worker's scratch directory, through a directory fd.

The worker's scratch is a private tmpfs inside its mount namespace: the parent holds a
directory fd of it (sent by the launcher), and the tmpfs stays readable through that fd after
the worker and its namespaces are gone. Every path is resolved one component at a time with
``O_NOFOLLOW``, so a candidate that plants symlinks cannot make the parent read its own files,
and every read is capped. Under the explicit no-isolation opt-out the scratch is a host
directory instead, removed on ``close``.
"""
from __future__ import annotations

import os
import shutil
import stat


class OverCap(Exception):
    """The file exists but is larger than the caller's cap."""


class ScratchView:
    """Reads files of one worker's scratch; ``close`` frees it (and removes a host directory)."""

    def __init__(self, fd: int, host_path: str | None = None) -> None:
        self.fd = fd
        self.host_path = host_path

    def read(self, relpath: str, cap: int) -> bytes | None:
        """Bytes of a regular file at ``relpath`` (``/``-separated), or None if it is missing,
        not a plain file, or reached through a symlink; OverCap if it is larger than ``cap``."""
        parts = relpath.split("/")
        fds: list[int] = []
        try:
            here = self.fd
            for part in parts[:-1]:
                here = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=here)
                fds.append(here)
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=here)
            fds.append(fd)
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return None
            if info.st_size > cap:
                raise OverCap(relpath)
            chunks, left = [], info.st_size
            while left > 0 and (chunk := os.read(fd, min(left, 1 << 24))):
                chunks.append(chunk)
                left -= len(chunk)
            return b"".join(chunks)
        except OSError:
            return None
        finally:
            for fd in fds:
                os.close(fd)

    def close(self) -> None:
        """Release the scratch: the private tmpfs is freed once no fd refers to it."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.host_path is not None:
            shutil.rmtree(self.host_path, ignore_errors=True)
            self.host_path = None
