"""Trusted launcher: puts a sandbox worker into its own namespaces before its interpreter starts.

Run by the parent as ``python -I -S launcher.py SPEC_JSON``. It imports the standard library
only, never the ``evaluator`` package (whose ``__init__`` chain imports torch, which starts
threads): ``unshare(CLONE_NEWUSER)`` needs a single-threaded caller, so isolation must be set
up here, before the worker's own interpreter imports anything.

What a worker gets (the same as root and as an ordinary user; an ordinary user gets it
through an unprivileged user namespace, which maps only its own uid):

* PID namespace: the worker is PID 1 there, so when it exits or is killed every process it
  made dies too, whatever session, process group or environment that process gave itself.
  It cannot see any process outside (no ``/proc/<parent>/environ`` or ``mem``).
* mount namespace with a new root (``pivot_root``): read-only binds of the system libraries,
  the Python installation and the ``evaluator`` package only; a minimal ``/dev``; a fresh
  ``/proc`` of its own PID namespace; ``/scratch`` (its cwd), ``/tmp`` and ``/dev/shm`` on one
  private tmpfs capped at ``scratch_bytes``. The user's home, caches, run directories and
  other users' files do not exist there.
* network namespace (only a loopback that is down: no TCP, no unix sockets of the host,
  abstract ones included), IPC and UTS namespaces; ``no_new_privs``; on x86-64 a seccomp
  filter refusing nested namespaces, ptrace, bpf, io_uring, keyrings, mount and modules.

The parent gets, over the control socket, a hello message saying what was set up, and a
directory fd of the private scratch tmpfs: it reads the worker's results through that fd
after the worker is gone (the tmpfs lives as long as the fd). Where the kernel refuses the
namespaces, the hello says so and the launcher exits without running anything, unless the
spec carries the explicit opt-out; then the worker runs with the weaker layers only (rlimits,
scrubbed environment, ``nobody`` as root, the audit hook) and the hello says ``none``.

The launcher's first process stays outside the PID namespace as a supervisor: it relays the
worker's exit status to the parent, and SIGKILLs the worker if the parent dies (the lifeline
pipe closes), so no candidate outlives the harness.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import re
import resource
import signal
import socket
import stat
import sys
import tempfile
import traceback
from typing import Callable

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
# Flags a bind remount must keep: in a user namespace the kernel refuses to clear them.
_KEEP_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC | 0x400 | 0x800 | 0x1000  # + NOATIME, NODIRATIME, RELATIME
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217, "riscv64": 41}
EXIT_REFUSED = 3  # no isolation and no opt-out: nothing ran
SKELETON = "/tmp"  # in our own mount namespace only: the host's /tmp is untouched

# System paths every Python needs; only those that exist are bound.
_SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/opt/conda")
_ETC = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/alternatives")
_DEVICES = ("null", "zero", "full", "random", "urandom")

_libc = ctypes.CDLL(None, use_errno=True)
# Siblings are imported as plain modules, not through the ``evaluator`` package (torch).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fdwait import ready_to_read  # noqa: E402
from seccomp_filter import install_seccomp  # noqa: E402


class IsolationError(Exception):
    """The kernel (or the machine's policy) refused part of the isolation."""


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise IsolationError(f"{what}: {os.strerror(err)} (errno {errno.errorcode.get(err, err)})")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {source or ''} on {target}")


def _unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def _prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                       ctypes.c_ulong(0)), f"prctl({option})")


# ---------------------------------------------------------------- the new root
def _submounts(path: str) -> list[str]:
    """Mount points at or below ``path`` in our mount namespace, outermost first."""
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            raw = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), line.split()[4].encode())
            point = os.fsdecode(raw)  # mountinfo escapes space, tab, newline and backslash in octal
            if point == path or point.startswith(path.rstrip("/") + "/"):
                found.append(point)
    return sorted(set(found), key=len)


def _read_only(target: str) -> None:
    """Remount a bind (and every mount below it) read-only, keeping the flags it must keep.

    A submount that cannot be made read-only is detached rather than left writable.
    """
    for i, point in enumerate(_submounts(target)):
        flags = os.statvfs(point).f_flag & _KEEP_FLAGS
        try:
            _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
        except IsolationError:
            if i == 0:
                raise
            _check(_libc.umount2(point.encode(), MNT_DETACH), f"umount {point}")


def _place(root: str, dest: str, is_dir: bool) -> str:
    """Create ``dest`` (a directory or an empty file) under ``root``, with its parents."""
    target = root + dest
    os.makedirs(target if is_dir else os.path.dirname(target), mode=0o755, exist_ok=True)
    if not is_dir and not os.path.exists(target):
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
    return target


def _bind(root: str, fd: int, dest: str, is_dir: bool, writable: bool = False) -> None:
    target = _place(root, dest, is_dir)
    _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)
    if not writable:
        _read_only(target)


def _sources(spec: dict) -> list[tuple[int, str, bool]]:
    """(O_PATH fd, destination, is_dir) of every read-only bind, opened before the skeleton
    tmpfs covers /tmp (a Python installation may live there). Symlinked top-level system
    paths (merged /usr) are recreated as symlinks instead, in ``_links``."""
    wanted = [(p, p) for p in _SYSTEM + _ETC if not os.path.islink(p)]
    wanted += [(p, p) for p in spec["python_paths"]]
    wanted += [(src, dest) for src, dest in spec["lib_binds"]]
    if spec.get("cuda"):
        wanted.append(("/sys", "/sys"))
    out, seen = [], []
    for src, dest in sorted(wanted, key=lambda w: w[1].count("/")):
        if not os.path.exists(src) or any(dest == s or dest.startswith(s.rstrip("/") + "/") for s in seen):
            continue  # already visible through an outer bind
        seen.append(dest)
        fd = os.open(src, os.O_PATH | os.O_CLOEXEC)
        out.append((fd, dest, stat.S_ISDIR(os.fstat(fd).st_mode)))
    return out


def _links() -> list[tuple[str, str]]:
    return [(p, os.readlink(p)) for p in _SYSTEM if os.path.islink(p)]


def build_root(spec: dict) -> tuple[int, dict]:
    """Build and enter the new root; returns (fd of the scratch tmpfs, what was set up)."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    sources, links = _sources(spec), _links()
    names = list(_DEVICES) + (sorted(n for n in os.listdir("/dev") if n.startswith("nvidia")) if spec.get("cuda") else [])
    devices = [(os.open(f"/dev/{n}", os.O_PATH | os.O_CLOEXEC), f"/dev/{n}") for n in names if os.path.exists(f"/dev/{n}")]
    root = SKELETON
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,mode=0755")
    for fd, dest, is_dir in sources:
        _bind(root, fd, dest, is_dir)
    for path, target in links:
        os.symlink(target, root + path)
    os.makedirs(root + "/dev", mode=0o755)
    _mount("tmpfs", root + "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=0755")
    for fd, dest in devices:  # the GPU's nodes too (nvidia-caps is a folder of them)
        _bind(root, fd, dest, is_dir=stat.S_ISDIR(os.fstat(fd).st_mode), writable=True)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{root}/dev/{name}")
    info = {"proc": True}
    os.makedirs(root + "/proc", mode=0o555)
    try:
        _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except IsolationError:
        info["proc"] = False  # some container runtimes forbid it: the worker then has no /proc at all

    # One private tmpfs for everything the candidate may write: its size is the cap.
    scratch = root + "/scratch"
    os.makedirs(scratch, mode=0o700)
    _mount("tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV, f"size={int(spec['scratch_bytes'])},mode=0700")
    owner = spec.get("owner")
    for sub, dest in (("tmp", "/tmp"), ("shm", "/dev/shm")):
        os.makedirs(f"{scratch}/{sub}", mode=0o700)
        os.makedirs(root + dest, mode=0o700, exist_ok=True)
        _mount(f"{scratch}/{sub}", root + dest, None, MS_BIND)
        if owner:
            os.chown(f"{scratch}/{sub}", *owner)
    if owner:
        os.chown(scratch, *owner)  # root drops to nobody before the candidate runs: nobody owns scratch
    scratch_fd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)

    os.chdir(root)
    pivot = _PIVOT_ROOT.get(platform.machine())
    if pivot is None:
        raise IsolationError(f"pivot_root: unknown syscall number on {platform.machine()}")
    _check(_libc.syscall(ctypes.c_long(pivot), b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "detach the old root")
    os.chdir("/")
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    _libc.sethostname(b"adrs-sandbox", 12)
    return scratch_fd, info


# ---------------------------------------------------------------- processes
def send_message(ctrl: int, message: dict, fds: list[int] = ()) -> None:
    sock = socket.socket(fileno=os.dup(ctrl))
    try:
        socket.send_fds(sock, [json.dumps(message).encode()], list(fds))
    finally:
        sock.close()


def _exec_worker(spec: dict, pythonpath: str, level: str) -> None:
    """Start the worker as a fresh interpreter (the fork server runs it in place instead)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = pythonpath
    env["ADRS_SANDBOX_LEVEL"] = level
    os.execve(spec["python"], spec["argv"], env)


def _supervise(child: int, lifeline: int) -> None:
    """Wait for the worker; kill it if the parent goes away; exit as it exited."""
    waitable = os.pidfd_open(child) if hasattr(os, "pidfd_open") else None
    while True:
        ready = ready_to_read([lifeline] + ([waitable] if waitable is not None else []),
                              None if waitable is not None else 0.1)
        if lifeline in ready:
            os.kill(child, signal.SIGKILL)  # the parent is gone: nobody will read the result
        done, status = os.waitpid(child, 0 if waitable is not None and waitable in ready else os.WNOHANG)
        if done:
            break
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):  # those two have no handler to reset
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)  # the parent reads the same signal it would have from the worker
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)


def _write_uid_maps(uid: int, gid: int) -> None:
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as fh:
            fh.write(text)


def isolate_and_run(spec: dict, start: Callable[[dict, str, str], None] = _exec_worker) -> None:
    """Unshare, fork PID 1, build the root, hand the scratch fd to the parent, ``start`` the worker
    there (``start(spec, pythonpath, level)`` never returns: it execs, or runs the worker and exits).

    Returns only on failure (IsolationError), before any worker code ran.
    """
    root = os.geteuid() == 0
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    _unshare(flags if root else flags | CLONE_NEWUSER)
    if not root:
        try:
            _write_uid_maps(uid, gid)
        except OSError as exc:
            raise IsolationError(f"user namespace id maps: {exc}") from None
    report_r, report_w = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(report_r)
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            scratch_fd, info = build_root(spec)
            _prctl(PR_SET_NO_NEW_PRIVS, 1)
            filtered = install_seccomp(_check)
            namespaces = ("user, " if not root else "") + "pid, mount, net, ipc, uts"
            detail = (f"namespaces ({namespaces}); read-only root; private /scratch, /tmp, /dev/shm "
                      f"capped at {int(spec['scratch_bytes']) >> 20} MiB" + ("" if info["proc"] else "; no /proc")
                      + ("; seccomp" if filtered else "; no seccomp filter on this architecture"))
            send_message(spec["control_fd"], {"level": "namespaces", "detail": detail}, [scratch_fd])
            os.close(scratch_fd)
            os.chdir("/scratch")
        except BaseException as exc:  # noqa: BLE001 - report any set-up failure to the supervisor
            os.write(report_w, f"{type(exc).__name__}: {exc}".encode()[:2000])
            os._exit(EXIT_REFUSED)
        os.close(report_w)  # set-up is done: the supervisor stops waiting for a failure report
        try:
            start(spec, spec["pythonpath"], "namespaces")
        except BaseException:  # noqa: BLE001 - the worker's (or exec's) failure: its log says why
            traceback.print_exc()
        os._exit(1)  # ``start`` returns only by failing
    os.close(report_w)
    failure = b""
    while chunk := os.read(report_r, 4096):  # EOF once the child's set-up is done
        failure += chunk
    if failure:
        os.waitpid(child, 0)
        raise IsolationError(failure.decode(errors="replace"))
    _supervise(child, spec["lifeline_fd"])


def run_unisolated(spec: dict, why: str) -> None:
    """The explicit opt-out: a host scratch directory, no namespaces."""
    scratch = tempfile.mkdtemp(prefix="adrs-sandbox-")
    if spec.get("owner"):
        os.chown(scratch, *spec["owner"])
    fd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
    send_message(spec["control_fd"], {"level": "none", "detail": f"NOT ISOLATED (explicit opt-out): {why}",
                               "scratch": scratch}, [fd])
    os.close(fd)
    os.chdir(scratch)
    _exec_worker(spec, spec["plain_pythonpath"], "none")


def main() -> None:
    spec = json.loads(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    why = "isolation disabled by the caller"
    if spec.get("isolate", True):
        try:
            isolate_and_run(spec)
        except IsolationError as exc:
            why = str(exc)
    if not spec.get("allow_unisolated"):
        send_message(spec["control_fd"], {"level": "refused", "detail": why})
        os._exit(EXIT_REFUSED)
    run_unisolated(spec, why)


if __name__ == "__main__":
    main()
