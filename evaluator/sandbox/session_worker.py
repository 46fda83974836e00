"""Worker side of a sandbox session (see ``evaluator.sandbox.session``).

Called by ``evaluator.sandbox.worker`` after the trusted prologue and the candidate's import,
so the candidate is already loaded and every limit is in place. Keeps one key cache per layer
(``[rows, h_kv, max_len, d]``): the shared prefix comes from the read-only file named in the
setup (or from the device, when a warm spare preloaded that file), every call appends its new keys; the masker gets a fresh copy of ``[:end]``, so what it
scribbles on is its own. Failures end the process through ``finish`` (status.json), which the
parent reads once it sees the process gone.

With a shared device block (``evaluator.sandbox.devshare``; the parent offered one and this
worker could map it), a call marked ``shared`` has its inputs in the block's input region and
a well-formed dense selection goes back as float32 in its output region, written and waited
for before the reply; the reply then carries only the selection's metadata. The worker's first
message says whether it mapped the block (``{"op": "hello", "shared": bool}``).
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable

import torch

from evaluator.contract import MaskerInput
from evaluator.records import record_seed
from evaluator.sandbox.channel import pack, read_blocking, write_blocking
from evaluator.sandbox.devicepack import encode_selection_on_device, is_dense_tensor, wire_form
from evaluator.sandbox.devshare import DTYPES, SharedBlock
from evaluator.sandbox.failure_text import failure_status
from evaluator.sandbox.transport import MappedTensors, dense_meta


def serve_session(job: dict[str, Any], files: dict[str, int], masker: Callable[[MaskerInput], Any],
                  finish: Callable[[dict], None], prefix_keys: dict[str, torch.Tensor] | None = None,
                  shared: SharedBlock | None = None) -> None:
    """Answer masker calls until the parent says close; never returns (``finish`` exits).

    ``files``: the session's fds from the parent (``req``, ``resp`` pipes, optional ``prefix``);
    ``prefix_keys``: that prefix's tensors, already on the device (a warm spare's preload);
    ``shared``: the parent's shared block, mapped (None: it offered none, or mapping failed)."""
    setup, device = job["session"], job["device"]
    req, resp = files["req"], files["resp"]
    if "shared" in setup:
        write_blocking(resp, pack({"op": "hello", "shared": shared is not None}, {}))
    out_at = int(setup["shared"]["out_at"]) if shared is not None else 0
    prefix: Callable[[str], torch.Tensor] | None = None  # a layer's prefix keys by name, read on its first call
    if prefix_keys is not None:
        prefix = prefix_keys.__getitem__
    elif "prefix" in files:
        prefix = MappedTensors(files["prefix"]).get_tensor
    groups, max_len = int(setup["row_groups"]), int(setup["max_len"])
    caches: dict[int, torch.Tensor] = {}
    states: dict[int, dict[str, Any]] = {}
    served = 0
    lap = _LapClock(device, bool(job.get("profile")))
    while True:
        try:
            header, data = read_blocking(req, float(job.get("spin_s", 0.0)))
        except EOFError:
            finish({"ok": False, "category": "harness", "reason": "the parent closed the session"})
        if header.get("op") == "close":
            finish({"ok": True, "calls": served})
        layer, call, start = int(header["layer"]), int(header["call"]), int(header["start"])
        via_block = shared is not None and "shared" in header
        if via_block:
            data = {name: shared.tensor(int(at), DTYPES[dtype], tuple(dims)).clone()
                    for name, dtype, dims, at in header["shared"]}
        lap("wait for and read the call")
        queries = data["q"].to(device)
        new_keys = data["k"].to(device)
        end = start + new_keys.shape[2]
        cache = caches.get(layer)
        if cache is None:
            lap("to device, key cache")
            cache = caches[layer] = _new_cache(prefix, layer, queries.shape[0], groups, max_len, new_keys, device)
            lap("prefix (a layer's first call)")
        cache[:, :, start:end] = new_keys
        lap("to device, key cache")
        gen = torch.Generator(device=device)
        gen.manual_seed(record_seed(job["base_seed"], call, layer))
        inp = MaskerInput(
            queries=queries, keys=cache[:, :, :end].clone(memory_format=torch.contiguous_format),
            scaling=float(header["scaling"]), query_positions=data["pos"].to(device), layer_idx=layer,
            num_layers=int(header["num_layers"]), density_target=job["density_target"], generator=gen,
            state=states.setdefault(layer, {}),
        )
        shape = (queries.shape[0], queries.shape[1], queries.shape[2], end)
        lap("masker inputs")
        try:
            selection = masker(inp)
            lap("masker")
            sel, at = wire_form(selection, shape, inp.num_kv_heads, device)
            if via_block and is_dense_tensor(sel, at, device) and out_at + 4 * sel.numel() <= shared.size:
                # A candidate's asynchronous error surfaces in this wait, as the candidate's.
                shared.tensor(out_at, torch.float32, at).copy_(sel)
                torch.cuda.current_stream().synchronize()
                tensors, meta, via = {}, dense_meta(sel), {"shared": True}
            else:
                tensors, meta = encode_selection_on_device(sel, at, device)
                via = {}
            lap("encode")
        except BaseException as exc:  # noqa: BLE001 - anything raised here is the candidate's
            finish(failure_status(exc, job["candidate"], where=f"call {call}, layer {layer}"))
        reply = pack({"meta": meta, **via}, tensors)
        lap("pack")
        write_blocking(resp, reply)
        served += 1
        lap("write")
        if served % 100 == 0:
            lap.report(served)
        del selection, sel, tensors, inp


def _new_cache(prefix: Callable[[str], torch.Tensor] | None, layer: int, rows: int, groups: int, max_len: int,
               like: torch.Tensor, device: str) -> torch.Tensor:
    """A layer's key cache: the shared prefix (``[rows / groups, h_kv, P, d]``) in every row group."""
    _, h_kv, _, d = like.shape
    cache = torch.zeros(rows, h_kv, max_len, d, dtype=like.dtype, device=device)
    if prefix is not None:
        keys = prefix(f"k{layer}").to(device)
        n, length = keys.shape[0], keys.shape[2]
        for g in range(groups):
            cache[g * n:(g + 1) * n, :, :length] = keys
    return cache


class _LapClock:
    """Seconds per phase of a call, when ``enabled`` (the parent's ``ADRS_PROFILE_SESSION=1``;
    otherwise every call returns at once): device work is waited for at each lap so that each
    phase owns its time; ``report`` prints the means to the log (``benchmarks/profile_faithful.py``
    reads them)."""

    def __init__(self, device: str, enabled: bool) -> None:
        self.enabled = enabled
        self.cuda = device.startswith("cuda")
        self.totals: dict[str, float] = {}
        self.t = time.perf_counter()

    def __call__(self, phase: str) -> None:
        if not self.enabled:
            return
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.totals[phase] = self.totals.get(phase, 0.0) + now - self.t
        self.t = now

    def report(self, calls: int) -> None:
        if not self.enabled:
            return
        means = {k: round(1e3 * v / calls, 4) for k, v in self.totals.items()}
        print("session_profile_ms " + json.dumps(means), file=sys.stderr, flush=True)
