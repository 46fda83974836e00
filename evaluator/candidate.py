"""Candidate files: load by path, split the EVOLVE block, build the masker's inputs."""
from __future__ import annotations

import ast
import importlib.util
import sys
import tempfile
import threading
import traceback
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from evaluator.contract import ENTRY_POINT, EVOLVE_END, EVOLVE_START, MaskerInput
from evaluator.records import AttentionRecord, record_seed

Masker = Callable[[MaskerInput], Any]


# CPython 3.11 keeps the ast module's recursion depth in shared state (python/cpython#106905):
# two threads converting ASTs at once fail with "AST constructor recursion depth mismatch".
# The loop parses replies on its event-loop thread while scoring threads format candidates'
# tracebacks, which in 3.11 parses source lines to place the carets. Every such call in the
# harness goes through this one lock.
AST_LOCK = threading.Lock()


def parse_source(source: str) -> ast.Module:
    """``ast.parse`` under the AST lock."""
    with AST_LOCK:
        return ast.parse(source)


def compile_tree(tree: ast.Module, filename: str) -> None:
    """Compile a parsed tree (a syntax check that runs nothing) under the AST lock."""
    with AST_LOCK:
        compile(tree, filename, "exec")


def format_traceback(limit: int = 8) -> str:
    """``traceback.format_exc`` under the AST lock (it may parse source lines)."""
    with AST_LOCK:
        return traceback.format_exc(limit=limit)


@contextmanager
def candidate_file(code: str) -> Iterator[Path]:
    """``code`` written as ``candidate.py`` in a fresh temporary directory, removed afterwards.

    Scorers take files (the sandbox copies them into its scratch directory); the loop,
    schedulers and CLI hold code as strings.
    """
    with tempfile.TemporaryDirectory(prefix="adrs-cand-") as tmp:
        path = Path(tmp) / "candidate.py"
        path.write_text(code)
        yield path


class CandidateFormatError(ValueError):
    """The file is not in the candidate format (missing or repeated EVOLVE markers)."""


@dataclass(frozen=True)
class CandidateParts:
    """A candidate split around its EVOLVE block; ``prefix + block + suffix`` is the file."""

    prefix: str
    block: str
    suffix: str

    def join(self, block: str | None = None) -> str:
        body = self.block if block is None else block
        if body and not body.endswith("\n"):
            body += "\n"
        return self.prefix + body + self.suffix


def split_candidate(source: str) -> CandidateParts:
    """Split at the marker lines; the markers stay in prefix and suffix (fixed scaffolding)."""
    lines = source.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == EVOLVE_START]
    ends = [i for i, line in enumerate(lines) if line.strip() == EVOLVE_END]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise CandidateFormatError(
            f"a candidate needs exactly one '{EVOLVE_START}' line followed by one '{EVOLVE_END}' line "
            f"(found {len(starts)} start, {len(ends)} end)"
        )
    s, e = starts[0], ends[0]
    return CandidateParts("".join(lines[: s + 1]), "".join(lines[s + 1 : e]), "".join(lines[e:]))


def load_masker(path: str | Path) -> Masker:
    """Import a candidate file under a fresh module name and return its ``masker``.

    This runs the file's code in the calling process: only the sandbox worker and
    trusted tests call it.
    """
    path = Path(path)
    name = f"adrs_candidate_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    fn = getattr(module, ENTRY_POINT, None)
    if not callable(fn):
        raise AttributeError(f"candidate defines no callable '{ENTRY_POINT}(inp)'")
    return fn


def masker_input(
    record: AttentionRecord, density_target: float, base_seed: int, state: dict[str, Any] | None = None,
) -> MaskerInput:
    """The inputs a masker sees for one record: queries and keys only, never values."""
    gen = torch.Generator(device=record.queries.device)
    gen.manual_seed(record_seed(base_seed, record.sample, record.layer))
    return MaskerInput(
        # Float32 whatever the record's scoring precision (the sandbox sends float32 too).
        queries=record.queries.to(torch.float32, copy=True), keys=record.keys.to(torch.float32, copy=True),
        scaling=record.scaling,
        query_positions=record.positions.clone(), layer_idx=record.layer, num_layers=record.num_layers,
        density_target=density_target, generator=gen, state={} if state is None else state,
    )
