"""Device memory shared between the trusted parent and one sandbox worker, for session round trips.

A faithful score is hundreds of masker calls in sequence. Over pipes, each call's inputs go
device -> host -> pipe -> host -> device and its selection is bit-packed on the worker's GPU,
copied out, sent and unpacked on ours: several host waits and dozens of launches on each side.
Here the parent allocates one block of GPU memory with the CUDA driver's virtual-memory API,
exports it as a file descriptor (``CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR``) and hands that
fd to the worker with its job; both map it. A call's inputs are copied into the block's input
region, a selection into its output region; the pipe carries only the headers.

Why this is safe to hand an untrusted worker:

* the block is its own allocation, outside torch's caching allocator: mapping it shows the
  worker nothing but what the parent copies there (the call's queries, new keys, positions);
* the parent never reads the input region, and reads the output region only by cloning it
  after the worker's reply; it validates and uses the clone. A worker that keeps writing
  meanwhile only changes which values it answered, which the validator then judges;
* the parent owns the physical memory: a worker that dies, unmaps or releases its handle
  leaves the parent's mapping valid;
* a fd import works across the worker's namespaces, without ptrace or the host's PIDs (what
  torch's own CUDA IPC needs).

Where the driver lacks this (no CUDA, an old driver, a device without POSIX fd handles),
``allocate`` returns None and sessions keep the pipe path.
"""
from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass
from typing import Any

import torch

_POSIX_FD = 1  # CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
_PINNED = 1  # CU_MEM_ALLOCATION_TYPE_PINNED
_ON_DEVICE = 1  # CU_MEM_LOCATION_TYPE_DEVICE
_READ_WRITE = 3  # CU_MEM_ACCESS_FLAGS_PROT_READWRITE
ALIGN = 256  # every tensor in the block starts on this boundary (any dtype's alignment)
DTYPES = {str(d): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64)}


class DriverError(RuntimeError):
    """A CUDA driver call failed."""


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class _AllocationProp(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", _Location),
                ("win32HandleMetaData", ctypes.c_void_p), ("allocFlags", _AllocFlags)]


class _AccessDesc(ctypes.Structure):
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


@functools.lru_cache(maxsize=1)
def _driver() -> ctypes.CDLL:
    """libcuda with the calls used here typed, initialised once per process (raises if it cannot be)."""
    lib = ctypes.CDLL("libcuda.so.1")
    u64, size_t, p = ctypes.c_uint64, ctypes.c_size_t, ctypes.POINTER
    signatures: dict[str, list[Any]] = {
        "cuInit": [ctypes.c_uint],
        "cuMemGetAllocationGranularity": [p(size_t), p(_AllocationProp), ctypes.c_int],
        "cuMemCreate": [p(u64), size_t, p(_AllocationProp), u64],
        "cuMemExportToShareableHandle": [ctypes.c_void_p, u64, ctypes.c_int, u64],
        "cuMemImportFromShareableHandle": [p(u64), ctypes.c_void_p, ctypes.c_int],
        "cuMemAddressReserve": [p(u64), size_t, size_t, u64, u64],
        "cuMemMap": [u64, size_t, size_t, u64, u64],
        "cuMemSetAccess": [u64, size_t, p(_AccessDesc), size_t],
        "cuMemUnmap": [u64, size_t],
        "cuMemAddressFree": [u64, size_t],
        "cuMemRelease": [u64],
    }
    for name, args in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    torch.cuda.init()  # the device's primary context, which torch's kernels (and so our views) use
    _check(lib.cuInit(0), "cuInit")
    return lib


def _check(result: int, what: str) -> None:
    if result != 0:
        raise DriverError(f"{what} failed with CUDA driver error {result}")


def _prop(ordinal: int) -> _AllocationProp:
    prop = _AllocationProp()
    prop.type, prop.requestedHandleTypes = _PINNED, _POSIX_FD
    prop.location = _Location(_ON_DEVICE, ordinal)
    return prop


@dataclass
class SharedBlock:
    """One mapping of a shared allocation: ``tensor(offset, dtype, shape)`` views into it."""

    device: torch.device
    size: int
    handle: int
    address: int
    fd: int | None  # the exported handle (parent side, until handed over)
    _base: torch.Tensor | None = None

    def bytes(self) -> torch.Tensor:
        """The whole block as a uint8 tensor on ``device`` (a view: it owns nothing)."""
        if self._base is None:
            self._base = torch.as_tensor(_DeviceArray(self.address, self.size), device=self.device)
        return self._base

    def tensor(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A view of ``shape`` and ``dtype`` at byte ``offset``; ValueError past the block's end."""
        count = 1
        for s in shape:
            count *= int(s)
        nbytes = count * torch.empty(0, dtype=dtype).element_size()
        if offset < 0 or offset % ALIGN or offset + nbytes > self.size:
            raise ValueError(f"{nbytes} bytes at offset {offset} do not fit a {self.size}-byte block")
        return self.bytes()[offset:offset + nbytes].view(dtype).view(shape)

    def close(self) -> None:
        """Unmap and release this side's handle (the memory lives on while the other side holds it)."""
        self._base = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.address:
            lib = _driver()
            _check(lib.cuMemUnmap(self.address, self.size), "cuMemUnmap")
            _check(lib.cuMemAddressFree(self.address, self.size), "cuMemAddressFree")
            _check(lib.cuMemRelease(self.handle), "cuMemRelease")
            self.address = 0


class _DeviceArray:
    """The ``__cuda_array_interface__`` of a raw mapping, so torch can view it without copying."""

    def __init__(self, address: int, size: int) -> None:
        self.__cuda_array_interface__ = {"shape": (size,), "typestr": "|u1", "data": (address, False),
                                         "version": 3, "strides": None}


def _map(handle: int, size: int, ordinal: int) -> int:
    lib = _driver()
    address = ctypes.c_uint64()
    _check(lib.cuMemAddressReserve(ctypes.byref(address), size, 0, 0, 0), "cuMemAddressReserve")
    try:
        _check(lib.cuMemMap(address.value, size, 0, handle, 0), "cuMemMap")
        access = _AccessDesc(_Location(_ON_DEVICE, ordinal), _READ_WRITE)
        _check(lib.cuMemSetAccess(address.value, size, ctypes.byref(access), 1), "cuMemSetAccess")
    except DriverError:
        lib.cuMemUnmap(address.value, size)  # may fail if the map did: the reservation is freed regardless
        lib.cuMemAddressFree(address.value, size)
        raise
    return address.value


def _ordinal(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def allocate(nbytes: int, device: torch.device) -> SharedBlock | None:
    """A fresh exportable block of at least ``nbytes`` on ``device`` (zeroed), mapped here, with its
    fd in ``.fd``; None where the driver cannot (see the module docstring)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        lib = _driver()
        ordinal = _ordinal(device)
        prop = _prop(ordinal)
        granularity = ctypes.c_size_t()
        _check(lib.cuMemGetAllocationGranularity(ctypes.byref(granularity), ctypes.byref(prop), 0), "granularity")
        size = -(-max(int(nbytes), 1) // granularity.value) * granularity.value
        handle = ctypes.c_uint64()
        _check(lib.cuMemCreate(ctypes.byref(handle), size, ctypes.byref(prop), 0), "cuMemCreate")
    except (OSError, AttributeError, DriverError):
        return None  # no libcuda, a driver without the VMM API, or no fd handles on this device
    fd = ctypes.c_int(-1)
    try:
        _check(lib.cuMemExportToShareableHandle(ctypes.byref(fd), handle.value, _POSIX_FD, 0), "export")
        address = _map(handle.value, size, ordinal)
    except DriverError:
        if fd.value >= 0:
            os.close(fd.value)
        lib.cuMemRelease(handle.value)
        return None
    block = SharedBlock(torch.device("cuda", ordinal), size, handle.value, address, fd.value)
    block.bytes().zero_()  # the physical pages are fresh, but say so rather than rely on it
    return block


def attach(fd: int, nbytes: int, device: str | torch.device) -> SharedBlock | None:
    """The worker's mapping of the parent's block from its fd (closed here either way); None if
    the driver refuses (the worker then says so and the session keeps the pipes)."""
    device = torch.device(device)
    try:
        lib = _driver()
        handle = ctypes.c_uint64()
        _check(lib.cuMemImportFromShareableHandle(ctypes.byref(handle), ctypes.c_void_p(fd), _POSIX_FD), "import")
    except (OSError, AttributeError, DriverError):
        return None
    finally:
        os.close(fd)
    ordinal = _ordinal(device)
    try:
        address = _map(handle.value, nbytes, ordinal)
    except DriverError:
        lib.cuMemRelease(handle.value)
        return None
    return SharedBlock(torch.device("cuda", ordinal), nbytes, handle.value, address, None)


def layout(tensors: dict[str, torch.Tensor]) -> tuple[list[list[Any]], int]:
    """Where each tensor goes in the input region: ``[[name, dtype, shape, offset], ...]`` and the bytes used."""
    places, at = [], 0
    for name, t in tensors.items():
        places.append([name, str(t.dtype), list(t.shape), at])
        at += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    return places, at
