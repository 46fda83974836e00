"""How a candidate's own failure is worded for its report (worker side, trusted code)."""
from __future__ import annotations

import os
import traceback

MAX_DETAILS = 4000
# The worker's own frames: the model should see its code, not ours.
_OURS = tuple(os.path.join("sandbox", name) for name in ("worker.py", "fast_worker.py", "session_worker.py", "encode_batch.py"))


def trim(text: str, limit: int = MAX_DETAILS) -> str:
    """Keep the end of a traceback (where the error is), marking the cut."""
    return text if len(text) <= limit else "...[trimmed]...\n" + text[-limit:]


def is_memory_error(exc: BaseException) -> bool:
    """An out-of-memory failure, whichever library raised it (Python, torch, the C allocator)."""
    if isinstance(exc, MemoryError):
        return True
    name = type(exc).__name__
    text = str(exc).lower()
    return name == "OutOfMemoryError" or "out of memory" in text or "can't allocate memory" in text \
        or "cannot allocate memory" in text


def candidate_traceback(exc: BaseException, candidate: str) -> str:
    """The traceback of ``exc`` without the worker's frames, trimmed to its end."""
    tb = traceback.TracebackException.from_exception(exc, limit=-12)
    tb.stack = traceback.StackSummary.from_list([f for f in tb.stack if not f.filename.endswith(_OURS)])
    return trim("".join(tb.format()))


def failure_status(exc: BaseException, candidate: str, category: str = "exception", where: str | None = None) -> dict:
    """A worker's status for a failure the candidate caused: ``category`` (``memory`` for an
    out-of-memory failure), the error and where it happened, its traceback without our frames."""
    reason = f"{type(exc).__name__}: {exc}" + (f" ({where})" if where else "")
    return {"ok": False, "category": "memory" if is_memory_error(exc) else category, "reason": reason[:1000],
            "details": candidate_traceback(exc, candidate)}
