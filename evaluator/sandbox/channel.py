"""Message framing of a sandbox session, over a pair of FIFOs in the worker's scratch folder.

A message is ``<u64 header length><u64 payload length>``, a JSON header, and a safetensors
payload (``safetensors.torch.save``: a data-only format, so nothing the worker sends can run
code in the parent). The parent side reads and writes non-blocking with a deadline and caps
every length: the worker may be hostile and write anything, or nothing.
"""
from __future__ import annotations

import collections
import json
import os
import struct
import threading
import time
from typing import Any, Callable

import torch
from safetensors.torch import load, save

from evaluator.sandbox.fdwait import wait_readable, wait_writable

_LENGTHS = struct.Struct("<QQ")
MAX_HEADER = 1 << 20
_CHUNK = 1 << 20


class ChannelError(RuntimeError):
    """The peer sent something that is not a well-formed message."""


def pack(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bytes:
    """One framed message; tensors must be on the CPU."""
    head = json.dumps(header).encode()
    body = save(tensors) if tensors else b""
    return _LENGTHS.pack(len(head), len(body)) + head + body


def unpack(head: bytes, body: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Parse a message's header and payload; ChannelError if either is malformed."""
    try:
        header = json.loads(head)
        tensors = load(body) if body else {}
    except Exception as exc:  # noqa: BLE001 - any parse failure of untrusted bytes is a protocol error
        raise ChannelError(f"malformed message: {type(exc).__name__}: {exc}"[:300]) from exc
    if not isinstance(header, dict):
        raise ChannelError("message header is not a JSON object")
    return header, tensors


def spin_until_readable(fd: int, spin_s: float) -> bool:
    """Poll ``fd`` without sleeping for up to ``spin_s`` seconds; True once it is readable.

    A session is a ping-pong of millisecond turns. A side that sleeps through the other's turn
    wakes on a cold, clocked-down core and runs its next steps several times slower (measured on
    an H200 host: 2-6x per phase); polling for the length of a turn keeps it warm. Only worth it
    where cores are plentiful (the caller decides)."""
    deadline = time.perf_counter() + spin_s
    while time.perf_counter() < deadline:
        if wait_readable(fd, 0):
            return True
    return False


# ---------------------------------------------------------------- blocking side (worker)
def read_blocking(fd: int, spin_s: float = 0.0) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read one message from a blocking fd (the worker trusts its parent), polling ``spin_s``
    seconds before sleeping (``spin_until_readable``)."""
    if spin_s > 0:
        spin_until_readable(fd, spin_s)
    head_len, body_len = _LENGTHS.unpack(_read_exact(fd, _LENGTHS.size))
    return unpack(_read_exact(fd, head_len), _read_exact(fd, body_len))


def _read_exact(fd: int, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, min(_CHUNK, n - len(buf)))
        if not chunk:
            raise EOFError("session channel closed")
        buf += chunk
    return bytes(buf)


def write_blocking(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# ---------------------------------------------------------------- deadline side (parent)
class DeadlineIO:
    """Non-blocking reads and writes on the parent's FIFO ends, polling ``check`` meanwhile.

    ``check()`` is called whenever the peer is not ready; it raises to abort (timeout, the
    worker died, it printed too much). ``pulse()``, if given, is called after every chunk that
    did arrive, so a peer trickling bytes cannot outrun the deadline (it must not treat the
    peer's exit as a failure: a last message may still be in the pipe). Every length the
    worker declares is capped.
    """

    def __init__(self, read_fd: int, write_fd: int | None, check: Callable[[], None], max_payload: int,
                 pulse: Callable[[], None] | None = None, spin_s: float = 0.0) -> None:
        """``write_fd`` None: a read-only channel (the fast score's result stream). ``spin_s``: poll
        that long for each message before sleeping in ``poll`` (``spin_until_readable``)."""
        self.read_fd, self.write_fd, self.check, self.max_payload = read_fd, write_fd, check, max_payload
        self.pulse = pulse
        self.spin_s = spin_s
        for fd in (read_fd, write_fd):
            if fd is not None:
                os.set_blocking(fd, False)

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            ready = wait_writable(self.write_fd, 0.05)
            written = _nonblocking(os.write, self.write_fd, view[:_CHUNK]) if ready else None
            if written:
                view = view[written:]
                if self.pulse is not None:
                    self.pulse()
                continue
            self.check()

    def receive(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        if self.spin_s > 0:
            spin_until_readable(self.read_fd, self.spin_s)
        head_len, body_len = _LENGTHS.unpack(self._read_exact(_LENGTHS.size))
        if head_len > MAX_HEADER:
            raise ChannelError(f"the worker announced a {head_len}-byte message header")
        if body_len > self.max_payload:
            raise ChannelOverflow(f"the worker announced a {body_len}-byte selection, over the {self.max_payload}-byte limit")
        return unpack(self._read_exact(head_len), self._read_exact(body_len))

    def _read_exact(self, n: int) -> bytes:
        """``n`` bytes. A message already in the pipe arrives in one read, and its bytes object is
        returned as it is; otherwise the chunks land in one buffer, so a message is copied twice
        at most before ``unpack`` (a fast score moves up to ~100 MB per candidate this way)."""
        if n == 0:
            return b""  # e.g. a status message's empty payload: a read of 0 bytes would look like end of file
        first = self._read(os.read, min(_CHUNK, n))
        if len(first) == n:
            return first
        buf = bytearray(n)
        view = memoryview(buf)
        view[:len(first)] = first
        got = len(first)
        while got < n:
            got += self._read(os.readv, [view[got:got + _CHUNK]])
        return bytes(buf)

    def _read(self, op: Callable[[int, Any], Any], arg: Any) -> Any:
        """``op(read_fd, arg)`` (``os.read`` or ``os.readv``) once it yields bytes, waiting for
        them as ``check`` allows."""
        while True:
            ready = wait_readable(self.read_fd, 0.05)
            got = _nonblocking(op, self.read_fd, arg) if ready else None
            if got:
                if self.pulse is not None:
                    self.pulse()
                return got
            if got is not None:
                time.sleep(0.002)  # end of file: the peer is exiting; let check() see it go without spinning
            self.check()


def _nonblocking(op: Callable[..., Any], fd: int, arg: Any) -> Any:
    """``op(fd, arg)``, or None when the fd is not ready after all (poll can wake spuriously)."""
    try:
        return op(fd, arg)
    except BlockingIOError:
        return None


class ChannelOverflow(ChannelError):
    """The worker tried to send more than the output limit allows."""


class ReadAhead:
    """Messages of a ``DeadlineIO``, read on a thread ahead of their consumer.

    The fast score's parent checks, decodes and scores each record; reading on the same thread
    left the worker waiting on a full pipe meanwhile (on an H200, 0.06 s of sink_window's 0.13 s
    in the worker). Here a thread reads and parses while the consumer works, holding at most
    ``limit`` payload bytes unconsumed; past that it stops reading, so a fast writer waits on
    the pipe as before and memory stays bounded. ``get`` hands the messages over in order, and
    then what ended the reading (an exception of ``receive``, e.g. the channel's own errors or
    whatever ``check`` raised), at its place in the stream. The reader stops after a message
    whose header has ``last_key`` (the status), or soon after ``stop``: within one wait for data
    (50 ms) or one chunk, even if something still holds the pipe open and writes."""

    def __init__(self, io: DeadlineIO, limit: int, last_key: str) -> None:
        self.io, self.limit, self.last_key = io, limit, last_key
        self._cond = threading.Condition()
        self._items: collections.deque[tuple[dict[str, Any], dict[str, torch.Tensor], int] | BaseException] = collections.deque()
        self._held = 0
        self._stopped = False
        check, pulse = io.check, io.pulse

        def stop_check() -> None:
            if self._stopped:
                raise _Stopped()
            check()

        def stop_pulse() -> None:
            if self._stopped:
                raise _Stopped()
            if pulse is not None:
                pulse()

        io.check, io.pulse = stop_check, stop_pulse  # the io is this reader's from now on
        self._thread = threading.Thread(target=self._read, name="adrs-result-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while True:
                header, tensors = self.io.receive()
                size = sum(t.numel() * t.element_size() for t in tensors.values())
                with self._cond:
                    while self._held > self.limit and not self._stopped:
                        self._cond.wait()
                    if self._stopped:
                        return
                    self._items.append((header, tensors, size))
                    self._held += size
                    self._cond.notify_all()
                if self.last_key in header:
                    return
        except _Stopped:
            return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, in order
            with self._cond:
                self._items.append(exc)
                self._cond.notify_all()

    def get(self) -> tuple[dict[str, Any], dict[str, torch.Tensor], int]:
        """The next message (header, tensors, payload bytes); raises what ended the reading."""
        with self._cond:
            while not self._items:
                self._cond.wait()
            item = self._items.popleft()
            if isinstance(item, BaseException):
                raise item
            self._held -= item[2]
            self._cond.notify_all()
            return item

    def stop(self) -> None:
        """No more messages are wanted: a reader waiting for room returns."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def join(self) -> None:
        """Wait for the reader (``stop`` it first); the fd may then be closed."""
        self._thread.join()


class _Stopped(Exception):
    """Raised inside a ``ReadAhead``'s reads once it is stopped."""
