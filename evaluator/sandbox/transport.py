"""What crosses the trust boundary, and in which form.

Parent -> worker: the workload's queries, keys, positions and scaling (never values or dense
outputs), written ONCE per workload and process to a world-readable safetensors file under
/dev/shm and memory-mapped by every worker (a warm spare loads it before its job). Worker ->
parent: one message per record on the result pipe (``channel.pack``: JSON header with the
record index and metadata, safetensors payload) holding the selection in a compact, exact form:

* dense ``[b, h, q, k]`` selections: a bit-packed mask of non-zero weights, a bit-packed mask
  (over those) of weights that are not exactly 1, and the float32 values of the latter;
* sparse selections: the indices as returned and the weights as float32.

Weights go through ``.to(torch.float32)`` in the worker, which is exactly what the trusted
validator does first, so the parent's scores are bit-identical to in-process scoring. The
type, shape, device and dtype the candidate returned travel as metadata; the parent judges
them (with the validator's own wording) and then validates the reconstructed tensors with
``evaluator.scoring.dense_weights``. Nothing the worker writes is trusted.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import mmap
import os
import struct
import warnings
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from evaluator.contract import SparseSelection
from evaluator.records import AttentionRecord
from evaluator.scoring import InvalidSelection, expected_shapes

PLAIN = "torch.Tensor"
SPARSE = "evaluator.contract.SparseSelection"


class ProtocolError(RuntimeError):
    """The worker wrote something that is not a well-formed result."""


# ---------------------------------------------------------------- workload inputs (parent)
_inputs_cache: dict[str, Path] = {}
_inputs_lock = threading.Lock()


def shared_dir(need: int = 0) -> Path:
    """/dev/shm when writable with room for twice ``need`` bytes (containers often give it 64 MB),
    else the temp dir: where files shared with sandbox workers go."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2 * need:
        return shm
    return Path(tempfile.gettempdir())


def _compact(t: torch.Tensor) -> torch.Tensor:
    """float16 when that round-trips exactly (captured workloads are float16), else float32."""
    t = t.detach().to("cpu", torch.float32).contiguous()
    half = t.to(torch.float16)
    return half if torch.equal(half.to(torch.float32), t) else t


def workload_inputs(workload: Any) -> Path:
    """Path of the shared file with ``workload``'s masker inputs, written on first use.

    One file per workload and parent process, removed at exit; later candidates reuse it.
    """
    # Key on which records are in the workload too: a subset of a workload has its label.
    which = hashlib.sha256(repr([(r.sample, r.layer) for r in workload.records]).encode()).hexdigest()[:8]
    key = f"{workload.label}-{workload.records[0].queries.device}-{which}"
    with _inputs_lock:
        path = _inputs_cache.get(key)
        if path is not None and path.exists():
            return path
        tensors: dict[str, torch.Tensor] = {}
        meta = []
        for i, rec in enumerate(workload.records):
            tensors[f"q{i}"] = _compact(rec.queries)
            tensors[f"k{i}"] = _compact(rec.keys)
            tensors[f"p{i}"] = rec.positions.detach().cpu().clone()
            meta.append([rec.sample, rec.layer, rec.num_layers, repr(float(rec.scaling))])
        safe_label = "".join(c if c.isalnum() else "_" for c in key)
        path = shared_dir() / f"adrs-sandbox-{os.getpid()}-{safe_label}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"records": json.dumps(meta)})
        os.chmod(tmp, 0o600)  # workers get it as an open fd: nobody else needs to read it
        os.replace(tmp, path)
        _inputs_cache[key] = path
        atexit.register(remove_file, path)
        return path


def remove_file(path: Path) -> None:
    """Remove a file that may already be gone (exit hooks and finalizers)."""
    path.unlink(missing_ok=True)


# ---------------------------------------------------------------- workload inputs (worker)
_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


# ``__metadata__["kind"]`` of a session's shared prefix keys (``evaluator.faithful.score.write_prefix_file``):
# a spare given such a file as its preload keeps its tensors on the device for the session's key cache.
SESSION_PREFIX = "session_prefix"


class MappedTensors:
    """A safetensors file read through an open fd, memory-mapped, tensors copied out on demand.

    The worker gets its input files as fds (its mount namespace has none of our paths), and
    ``safetensors.safe_open`` only takes a path.
    """

    def __init__(self, fd: int) -> None:
        self._map = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        (n,) = struct.unpack("<Q", self._map[:8])
        header = json.loads(self._map[8:8 + n])
        self._meta = header.pop("__metadata__", {}) or {}
        self._entries = header
        self._base = 8 + n

    def metadata(self) -> dict[str, str]:
        return self._meta

    def keys(self) -> list[str]:
        return list(self._entries)

    def get_tensor(self, name: str) -> torch.Tensor:
        """A copy of tensor ``name`` (the mapping is read-only; the copy is the caller's)."""
        entry = self._entries[name]
        start, end = entry["data_offsets"]
        dtype = _DTYPES[entry["dtype"]]
        if end == start:
            return torch.empty(entry["shape"], dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "buffer is not writable": we only read it, into a copy
            flat = torch.frombuffer(self._map, dtype=torch.uint8, count=end - start, offset=self._base + start)
        return flat.clone().view(dtype).reshape(entry["shape"])


class InputReader:
    """Memory-mapped view of a workload inputs file; builds masker-ready records one by one."""

    def __init__(self, source: int | MappedTensors, device: str) -> None:
        """``source``: the file's fd, or the file already mapped."""
        self._file = source if isinstance(source, MappedTensors) else MappedTensors(source)
        self.meta = json.loads(self._file.metadata()["records"])
        self.device = device

    def __len__(self) -> int:
        return len(self.meta)

    def _load(self, name: str) -> torch.Tensor:
        """A stored tensor as float32 on the device, converted there: ``.to(cuda, float32)`` on a
        host tensor converts on the host first and ships twice the bytes. Exact either way."""
        return self._file.get_tensor(name).to(self.device).to(torch.float32)

    def records(self) -> list[AttentionRecord]:
        """Every record, loaded now (a warm spare does this before its job arrives)."""
        return [self.record(i) for i in range(len(self))]

    def record(self, i: int) -> AttentionRecord:
        """An AttentionRecord without values or dense output (empty tensors stand in)."""
        sample, layer, num_layers, scaling = self.meta[i]
        get = self._file.get_tensor
        empty = torch.empty(0, device=self.device)
        return AttentionRecord(
            sample=sample, layer=layer, num_layers=num_layers,
            queries=self._load(f"q{i}"), keys=self._load(f"k{i}"),
            values=empty, positions=get(f"p{i}").to(self.device), scaling=float(scaling), dense_out=empty,
        )


# ---------------------------------------------------------------- selections (worker side)
def _type_name(x: Any) -> str:
    return f"{type(x).__module__}.{type(x).__qualname__}"


def _tensor_meta(x: Any) -> dict[str, Any]:
    if not isinstance(x, torch.Tensor):
        return {"type": _type_name(x)}
    return {"type": _type_name(x), "shape": list(x.shape), "dtype": str(x.dtype), "device": str(x.device)}


def dense_meta(sel: Any) -> dict[str, Any]:
    """The metadata a dense selection travels with (the parent judges it with the validator's wording)."""
    return {"kind": "dense", **_tensor_meta(sel)}


def encode_selection(sel: Any, shape: tuple[int, ...], device: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Compact form of what a masker returned: (tensors, metadata).

    Data is only sent when type, shape, device and dtype look right; otherwise the metadata
    alone lets the parent produce the validator's reason without shipping a huge tensor.
    """
    if isinstance(sel, SparseSelection):
        meta = {"kind": "sparse", "type": _type_name(sel), "indices": _tensor_meta(sel.indices), "weights": _tensor_meta(sel.weights)}
        idx, w = sel.indices, sel.weights
        ok = (type(sel) is SparseSelection and type(idx) is torch.Tensor and type(w) is torch.Tensor
              and idx.dim() == 4 and tuple(idx.shape[:3]) == tuple(shape[:3]) and idx.shape == w.shape
              and str(idx.device) == device and str(w.device) == device
              and idx.dtype in (torch.int32, torch.int64) and w.dtype.is_floating_point)
        if not ok:
            return {}, meta
        return {"indices": idx.detach().cpu().contiguous(), "weights": w.detach().to(torch.float32).cpu().contiguous()}, meta
    meta = dense_meta(sel)
    if not (type(sel) is torch.Tensor and tuple(sel.shape) == tuple(shape) and str(sel.device) == device
            and (sel.dtype.is_floating_point or sel.dtype == torch.bool)):
        return {}, meta
    w = sel.detach().to(torch.float32).cpu().reshape(-1)
    nz = w != 0  # NaN != 0, so NaN travels as a value and is rejected by the parent
    vals = w[nz]
    not_one = vals != 1
    tensors = {
        "nz": torch.from_numpy(np.packbits(nz.numpy())),
        "ne1": torch.from_numpy(np.packbits(not_one.numpy())),
        "vals": vals[not_one].contiguous(),
    }
    return tensors, meta


# ---------------------------------------------------------------- selections (parent side)
def _reject_meta(m: dict[str, Any], what: str, record: AttentionRecord) -> None:
    """Mirror of the validator's type check on declared metadata."""
    if m.get("type") != PLAIN:
        raise InvalidSelection(f"{what} must be a plain torch.Tensor, got {m.get('type')}")


def decode_selection(path: Path | None, meta: dict[str, Any], record: AttentionRecord,
                     tensors: dict[str, torch.Tensor] | None = None) -> Any:
    """Rebuild the selection of ``record`` from the worker's file; InvalidSelection if it broke the contract.

    ``tensors``: the file's content, already read (sandbox sessions receive it over a pipe).

    Raises ProtocolError if the file does not match its own metadata (a tampered worker).
    """
    shape = record.weights_shape
    device = record.queries.device
    kind = meta.get("kind")
    if kind == "sparse":
        if meta.get("type") != SPARSE:
            raise InvalidSelection("selection must be evaluator.contract.SparseSelection itself, not a subclass")
        mi, mw = meta.get("indices", {}), meta.get("weights", {})
        _reject_meta(mi, "SparseSelection.indices", record)
        _reject_meta(mw, "SparseSelection.weights", record)
        ishape, wshape = tuple(mi.get("shape", ())), tuple(mw.get("shape", ()))
        if len(ishape) != 4 or ishape[:3] != shape[:3] or ishape != wshape:
            raise InvalidSelection(
                f"SparseSelection indices {ishape} and weights {wshape} must both be {expected_shapes(record, sparse=True)}")
        if mi.get("device") != str(device) or mw.get("device") != str(device):
            raise InvalidSelection(f"SparseSelection is on {mi.get('device')}/{mw.get('device')}, inputs are on {device}")
        if mi.get("dtype") not in ("torch.int32", "torch.int64") or not _is_float(mw.get("dtype")):
            raise InvalidSelection(f"SparseSelection needs integer indices and float weights, got {mi.get('dtype')}/{mw.get('dtype')}")
        t = load_file(str(path)) if tensors is None else tensors
        idx, w = t.get("indices"), t.get("weights")
        if idx is None or w is None or tuple(idx.shape) != ishape or tuple(w.shape) != ishape \
                or str(idx.dtype) != mi["dtype"] or w.dtype != torch.float32:
            raise ProtocolError("sparse selection data does not match its metadata")
        return SparseSelection(idx.to(device), w.to(device))
    if kind != "dense":
        raise ProtocolError(f"unknown selection kind {kind!r}")
    _reject_meta(meta, "selection", record)
    got = tuple(meta.get("shape", ()))
    if got != shape:
        raise InvalidSelection(f"selection has shape {got}, expected {expected_shapes(record)}")
    if meta.get("device") != str(device):
        raise InvalidSelection(f"selection is on {meta.get('device')}, inputs are on {device}")
    dtype = meta.get("dtype")
    if not (_is_float(dtype) or dtype == "torch.bool"):
        raise InvalidSelection(f"selection dtype {dtype} is not floating point or bool")
    t = load_file(str(path)) if tensors is None else tensors
    n = int(np.prod(shape))
    try:
        nz = torch.from_numpy(np.unpackbits(t["nz"].numpy(), count=n).astype(bool))
        n_sel = int(nz.sum())
        ne1 = torch.from_numpy(np.unpackbits(t["ne1"].numpy(), count=n_sel).astype(bool))
        vals = t["vals"]
        if vals.dtype != torch.float32 or vals.dim() != 1 or vals.numel() != int(ne1.sum()) \
                or t["nz"].numel() != (n + 7) // 8 or t["ne1"].numel() != (n_sel + 7) // 8:
            raise ValueError
    except (KeyError, ValueError, TypeError) as exc:
        raise ProtocolError("dense selection data does not match its metadata") from exc
    selected = torch.ones(n_sel, dtype=torch.float32)
    selected[ne1] = vals
    dense = torch.zeros(n, dtype=torch.float32)
    dense[nz] = selected
    return dense.reshape(shape).to(device)


def _is_float(dtype: Any) -> bool:
    return dtype in ("torch.float16", "torch.bfloat16", "torch.float32", "torch.float64",
                     "torch.float8_e4m3fn", "torch.float8_e5m2")
