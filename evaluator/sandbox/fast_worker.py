"""Worker side of the fast score: the masker on every record, the selections streamed back.

Called by ``evaluator.sandbox.worker`` after the trusted prologue and the candidate's import,
so every limit is in place. One message per record goes down the result pipe
(``channel.pack``), in record order, and the status last through ``finish``, which exits. On a
GPU, dense selections wait in a batch and are encoded a few records at a time
(``encode_batch``); the records before one encoded alone, or before a failure, are sent first,
so the parent reads the same stream either way.

A successful status carries the worker's own clock (``timing``): from the job to the first
masker call, that call, and the rest; and the rest's seconds in the masker, in encoding and in
sending (blocked on a full pipe, the parent being behind). Host time: device work lands in
whichever phase waits for it first. It is the candidate process's word, so nothing scores
with it; benchmarks read it to see where a worker's time goes (``profile_fast_score.py``).
"""
from __future__ import annotations

import time
from typing import Any, Callable

from evaluator.candidate import masker_input
from evaluator.contract import MaskerInput
from evaluator.records import AttentionRecord
from evaluator.sandbox.channel import pack, write_blocking
from evaluator.sandbox.devicepack import encode_for_wire
from evaluator.sandbox.encode_batch import EncodeBatch
from evaluator.sandbox.failure_text import failure_status


def serve_records(job: dict[str, Any], records: list[AttentionRecord], masker: Callable[[MaskerInput], Any], results: int,
                  output_bytes: int, finish: Callable[[dict], None], candidate: str, job_received: float) -> None:
    """Run ``masker`` on each record and stream its selection to the ``results`` pipe; never
    returns (``finish`` exits). ``output_bytes``: the cap on all selections together;
    ``job_received``: ``time.perf_counter()`` when the job arrived."""
    sent, written = 0, 0
    spent = {"masker_s": 0.0, "encode_s": 0.0, "send_s": 0.0}  # after the first call

    def send(i: int, where: str, tensors: dict, meta: dict) -> None:
        nonlocal sent, written
        # Check the size before sending: the parent stops reading past the output limit.
        written += sum(t.numel() * t.element_size() for t in tensors.values()) + 1024
        if written > output_bytes:
            finish({"ok": False, "category": "output",
                    "reason": f"selections exceed {output_bytes} bytes (at {where}); return fewer or sparser tensors"})
        t = time.perf_counter()
        write_blocking(results, pack({"i": i, "meta": meta}, tensors))
        spent["send_s"] += time.perf_counter() - t
        sent += 1

    def failed(exc: BaseException, where: str) -> None:
        finish(failure_status(exc, candidate, where=where))

    # On a GPU, dense selections wait in a batch and are encoded a few records at a time
    # (encode_batch); the records before anything sent alone, or before a failure, go first.
    batch = EncodeBatch(job["device"]) if job["device"].startswith("cuda") else None
    waiting: list[tuple[int, str]] = []

    def send_batch() -> None:
        if not waiting:
            return
        try:
            t = time.perf_counter()
            encoded = batch.drain()
            spent["encode_s"] += time.perf_counter() - t
        except BaseException as exc:  # noqa: BLE001 - e.g. an asynchronous CUDA error of the candidate's kernels
            failed(exc, waiting[0][1])
        for (i, where), (tensors, meta) in zip(waiting, encoded):
            send(i, where, tensors, meta)
        waiting.clear()

    first_call: tuple[float, float] | None = None
    for i, rec in enumerate(records):
        where = f"sample {rec.sample}, layer {rec.layer}"
        alone = None
        try:
            called = time.perf_counter()
            selection = masker(masker_input(rec, job["density_target"], job["base_seed"], state={}))
            returned = time.perf_counter()
            if first_call is None:
                first_call = (called, returned)
            else:
                spent["masker_s"] += returned - called
            if batch is None or not batch.add(selection, rec.weights_shape, rec.keys.shape[1]):
                # Packed where the selection lives: only bits and non-unit values cross to the host.
                alone = encode_for_wire(selection, rec.weights_shape, rec.keys.shape[1], str(rec.queries.device))
            spent["encode_s"] += time.perf_counter() - returned
        except BaseException as exc:  # noqa: BLE001
            send_batch()
            failed(exc, where)
        if alone is None:
            waiting.append((i, where))
            if batch.full():
                send_batch()
        else:
            send_batch()
            send(i, where, *alone)
        records[i] = None  # type: ignore[call-overload] - its inputs are no longer needed
        del selection, alone
    send_batch()
    timing = {}
    if first_call is not None:
        timing = {"to_first_call_s": first_call[0] - job_received, "first_call_s": first_call[1] - first_call[0],
                  "after_first_call_s": time.perf_counter() - first_call[1], **spent}
    finish({"ok": True, "records": sent, "timing": timing})
