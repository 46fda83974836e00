"""The sandbox's seccomp filter, installed by ``launcher.py`` just before it execs a worker.

Standard library only: the launcher imports this file as a plain module (never through the
``evaluator`` package, whose imports start torch's threads). Classic BPF over
``struct seccomp_data`` (``nr`` at offset 0, ``arch`` at 4, ``args[0]`` at 16).
"""
from __future__ import annotations

import ctypes
import errno
import platform
from typing import Callable

CLONE_NAMESPACES = 0x00020000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x02000000
# Syscalls a masker never needs and kernel exploits love: nested namespaces, tracing, eBPF,
# io_uring, keyrings, mounting, modules. x86-64 numbers; other architectures go without.
_DENIED_X86_64 = {
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "add_key": 248, "request_key": 249,
    "keyctl": 250, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "mount": 165, "umount2": 166,
    "pivot_root": 155, "unshare": 272, "setns": 308, "kexec_load": 246, "kexec_file_load": 320,
    "init_module": 175, "finit_module": 313, "delete_module": 176, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "open_by_handle_at": 304, "open_tree": 428, "move_mount": 429, "fsopen": 430,
    "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442, "swapon": 167, "swapoff": 168,
    "reboot": 169, "acct": 163, "clone3": 435,  # clone3 hides its flags in memory: ENOSYS makes libc use clone
}
_X86_64_CLONE = 56
_AUDIT_ARCH_X86_64 = 0xC000003E
_RET_ALLOW, _RET_ERRNO = 0x7FFF0000, 0x00050000


def _seccomp_program() -> list[tuple[int, int, int, int]]:
    """A classic-BPF filter: EPERM for the denied syscalls and for clone() with namespace flags."""
    ld, jeq, jset, jge, ret = 0x20, 0x15, 0x45, 0x35, 0x06
    eperm, enosys = _RET_ERRNO | errno.EPERM, _RET_ERRNO | errno.ENOSYS
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, _AUDIT_ARCH_X86_64), (ret, 0, 0, eperm),  # another ABI: refuse all
            (ld, 0, 0, 0), (jge, 0, 1, 0x40000000), (ret, 0, 0, eperm)]  # x32 syscalls
    for name, nr in _DENIED_X86_64.items():
        prog += [(jeq, 0, 1, nr), (ret, 0, 0, enosys if name == "clone3" else eperm)]
    prog += [(jeq, 0, 3, _X86_64_CLONE), (ld, 0, 0, 16), (jset, 0, 1, CLONE_NAMESPACES), (ret, 0, 0, eperm),
             (ret, 0, 0, _RET_ALLOW)]
    return prog


def install_seccomp(check: Callable[[int, str], None]) -> bool:
    """Install the filter on this process and its future children (needs no_new_privs).

    False where unsupported (not x86-64); ``check(result, what)`` raises on a failed call.
    """
    if platform.machine() != "x86_64":
        return False

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    program = _seccomp_program()
    filters = (SockFilter * len(program))(*[SockFilter(*ins) for ins in program])
    fprog = SockFprog(len(program), filters)
    libc = ctypes.CDLL(None, use_errno=True)
    check(libc.prctl(ctypes.c_int(22), ctypes.c_ulong(2), ctypes.byref(fprog), ctypes.c_ulong(0), ctypes.c_ulong(0)),
           "seccomp filter")  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
    return True
