"""OS-level isolation primitives, shared by the trusted parent and the worker's prologue.

The worker applies its own limits in a trusted prologue (before torch is imported and long
before candidate code runs) rather than in a ``preexec_fn``: the parent is multi-threaded
(torch), and Python documents ``preexec_fn`` as unsafe there. The effect is the same: the
candidate only ever runs after every limit below is in place.
"""
from __future__ import annotations

import os
import re
import resource
import signal
import sys
from pathlib import Path
from typing import Iterable, Mapping

NOBODY = 65534

# Environment variables passed to the worker as they are; everything else is dropped.
_KEEP = ("PATH", "PYTHONPATH", "LANG", "LC_ALL", "TZ", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
         "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_MAX_CONNECTIONS", "CUBLAS_WORKSPACE_CONFIG", "PYTHONHASHSEED")
# Defence in depth: even an allow-listed name is dropped if it looks like a secret.
_SECRET = re.compile(r"(_KEY|_TOKEN|_SECRET)$|PASSWORD|^OPENAI_|^ANTHROPIC_|^ADRS_LLM_", re.IGNORECASE)
MARKER_VAR = "ADRS_SANDBOX_RUN"


def scrubbed_env(source: Mapping[str, str], marker: str, pythonpath: str) -> dict[str, str]:
    """Minimal environment for a worker: no secrets, a neutral HOME, a run marker.

    The marker lets the parent find descendants that left the process group (``setsid``).
    """
    env = {k: v for k, v in source.items() if k in _KEEP and not _SECRET.search(k)}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env["PYTHONPATH"] = pythonpath + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["HOME"] = "/nonexistent"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONNOUSERSITE"] = "1"
    env[MARKER_VAR] = marker
    return env


def is_root() -> bool:
    return os.geteuid() == 0


def apply_rlimits(memory_mb: int | None, file_bytes: int, nproc: int | None) -> None:
    """Address space, largest file, no core dumps, and (if given) the task count."""
    def lower(which: int, value: int) -> None:
        soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value))

    if memory_mb is not None:
        lower(resource.RLIMIT_AS, memory_mb * 1024 * 1024)
    lower(resource.RLIMIT_FSIZE, file_bytes)
    lower(resource.RLIMIT_CORE, 0)
    if nproc is not None:
        lower(resource.RLIMIT_NPROC, nproc)


def limit_address_space(extra_mb: int) -> None:
    """RLIMIT_AS = what is mapped now + ``extra_mb``: the candidate's own allowance.

    Set after the trusted prologue has imported torch and mapped its inputs, so the limit does
    not depend on how much address space a given torch build reserves at import (a CUDA build
    reserves gigabytes even on a CPU job).
    """
    try:
        with open("/proc/self/statm") as fh:
            mapped = int(fh.read().split()[0]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        mapped = 0  # no /proc: the allowance alone
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    value = mapped + extra_mb * 1024 * 1024
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(resource.RLIMIT_AS, (value, value))


def drop_privileges(uid: int = NOBODY, gid: int = NOBODY) -> None:
    """Irreversibly become ``uid:gid`` with no supplementary groups (root only)."""
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise RuntimeError("failed to drop privileges")


# Audit events a masker has no business raising.
_DENIED_EVENTS = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                  "os.forkpty", "socket.connect", "socket.bind", "socket.sendto", "os.kill", "os.killpg")


def install_audit_hook(scratch: str) -> None:
    """Refuse process creation, sockets, signals and writes outside ``scratch`` (defence in depth)."""
    scratch = os.path.realpath(scratch)
    denied = frozenset(_DENIED_EVENTS)

    def hook(event: str, args: tuple) -> None:
        if event in denied:
            raise PermissionError(f"sandbox: {event} is not allowed in a masker")
        if event == "open" and len(args) >= 3:
            # builtins.open passes a mode string; os.open passes mode None and integer flags.
            path, mode, flags = args[0], args[1], args[2]
            if isinstance(mode, str):
                writing = any(c in mode for c in "wax+")
            else:
                writing = isinstance(flags, int) and bool(
                    flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC))
            if writing and isinstance(path, (str, bytes, os.PathLike)):
                real = os.path.realpath(os.fsdecode(path))
                if real != scratch and not real.startswith(scratch + os.sep):
                    raise PermissionError(f"sandbox: writing {real} (outside the scratch directory) is not allowed")

    sys.addaudithook(hook)


def _stat_fields(pid: int) -> tuple[str, int] | None:
    """(state, process group) of ``pid`` from /proc, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rindex(")") + 2:].split()
    return rest[0], int(rest[2])


def _has_marker(pid: int, marker: str) -> bool:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{MARKER_VAR}={marker}".encode() in env.split(b"\0")


def _pids() -> Iterable[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


def live_descendants(pgid: int, marker: str | None = None) -> list[int]:
    """Pids (not zombies) in process group ``pgid`` or carrying the run ``marker``."""
    found = []
    me = os.getpid()
    for pid in _pids():
        if pid == me:
            continue
        fields = _stat_fields(pid)
        if fields is None or fields[0] in ("Z", "X"):
            continue
        if fields[1] == pgid or (marker is not None and _has_marker(pid, marker)):
            found.append(pid)
    return found


def kill_tree(pgid: int, marker: str | None = None, rounds: int = 5) -> None:
    """SIGKILL the whole process group, then anything that escaped it but carries the marker.

    Repeated a few times because a fork racing the first kill can leave a fresh child behind.
    """
    import time

    for _ in range(rounds):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        stragglers = live_descendants(pgid, marker)
        if not stragglers:
            return
        for pid in stragglers:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.05)
