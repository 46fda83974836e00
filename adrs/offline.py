"""A mutator that needs no LLM: numeric perturbation and constant crossover of EVOLVE blocks.

Used when no endpoint is configured, in tests, and as the baseline an LLM must beat. It is
deterministic: the same ``seed`` and ``key`` (e.g. the iteration number) give the same child,
so a run replays exactly and a resumed run continues where it stopped.
"""
from __future__ import annotations

import ast
import dataclasses
import math
import random
from dataclasses import dataclass

from adrs.llm.budget import Usage
from adrs.llm.proposal import Proposal
from adrs.mutation import MutationResult, apply_rewrite
from evaluator.candidate import parse_source, split_candidate

# Keyword arguments whose numbers are structural (tensor axes), not tunable constants.
STRUCTURAL_KEYWORDS = frozenset({"dim", "axis", "dims", "ndim", "k", "diagonal"})


@dataclass(frozen=True)
class NumericConstant:
    """A number literal in the block: where it is and whether it is a top-level setting."""

    value: int | float
    lineno: int
    col: int  # UTF-8 byte offsets, as ast reports them
    end_col: int
    top_level: bool


def _top_level_constant_ids(tree: ast.Module) -> set[int]:
    ids: set[int] = set()
    for stmt in tree.body:
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and stmt.value is not None:
            ids.update(id(n) for n in ast.walk(stmt.value) if isinstance(n, ast.Constant))
    return ids


def _structural_ids(tree: ast.Module) -> set[int]:
    """Constants used as indices/slices or axis arguments: changing them breaks shapes."""
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript):
            ids.update(id(n) for n in ast.walk(node.slice))
        elif isinstance(node, ast.keyword) and node.arg in STRUCTURAL_KEYWORDS:
            ids.update(id(n) for n in ast.walk(node.value))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            ids.add(id(node.operand))  # -1, -2: almost always axes or indices
    return ids


def find_constants(block: str) -> list[NumericConstant]:
    """Tunable number literals of an EVOLVE block.

    Top-level settings (``NAME = 4``) of any type, and float literals elsewhere. Integers
    inside functions are left alone: they are nearly always axes, indices or shapes, and
    perturbing them yields crashes rather than information. Bools, zeros, subscripts and
    axis arguments are never touched.
    """
    tree = parse_source(block)
    top, structural = _top_level_constant_ids(tree), _structural_ids(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or isinstance(node.value, bool):
            continue
        if not isinstance(node.value, (int, float)) or node.value == 0 or id(node) in structural:
            continue
        if node.lineno != node.end_lineno or not math.isfinite(node.value):
            continue
        is_top = id(node) in top
        if isinstance(node.value, int) and not is_top:
            continue
        found.append(NumericConstant(node.value, node.lineno, node.col_offset, node.end_col_offset, is_top))
    return sorted(found, key=lambda c: (c.lineno, c.col))


def _format_float(x: float) -> str:
    text = f"{x:.4g}"
    return text if any(ch in text for ch in ".einf") else text + ".0"


def perturb_value(value: int | float, rng: random.Random, sigma: float = 0.35) -> int | float:
    """A nearby value of the same type and sign; fractions in (0, 1) stay in (0, 1)."""
    if isinstance(value, int):
        new = round(value * math.exp(rng.gauss(0.0, sigma)))
        if new == value:
            new = value + rng.choice((-1, 1))
        if value > 0 and new < 1:
            new = 1 if value != 1 else 2  # keep positive, and still change
        return int(new)
    if 0.0 < value < 1.0:  # probabilities/fractions: perturb in logit space
        logit = math.log(value / (1.0 - value)) + rng.gauss(0.0, sigma)
        return 1.0 / (1.0 + math.exp(-logit))
    return value * math.exp(rng.gauss(0.0, sigma))


def _replace_spans(block: str, spans: list[tuple[int, int, int, str]]) -> str:
    """Replace ``(lineno, col, end_col, text)`` spans (byte offsets), last first so offsets hold."""
    lines = block.splitlines(keepends=True)
    for lineno, col, end_col, text in sorted(spans, reverse=True):
        raw = lines[lineno - 1].encode()
        lines[lineno - 1] = (raw[:col] + text.encode() + raw[end_col:]).decode()
    return "".join(lines)


def perturb_block(block: str, rng: random.Random, max_changes: int = 2, sigma: float = 0.35,
                  top_level_bias: float = 0.7) -> tuple[str, list[str]]:
    """Perturb 1..max_changes constants; top-level settings are preferred when present."""
    consts = find_constants(block)
    if not consts:
        return block, []
    top = [c for c in consts if c.top_level]
    pool = top if top and rng.random() < top_level_bias else consts
    chosen = rng.sample(pool, k=min(len(pool), rng.randint(1, max_changes)))
    spans, changes = [], []
    for c in chosen:
        old_text = block.splitlines()[c.lineno - 1].encode()[c.col:c.end_col].decode()
        for _ in range(8):  # a float may round back to its own text; draw again
            new = perturb_value(c.value, rng, sigma)
            text = str(new) if isinstance(new, int) else _format_float(new)
            if text != old_text:
                break
        spans.append((c.lineno, c.col, c.end_col, text))
        changes.append(f"block line {c.lineno}: {old_text} -> {text}")
    return _replace_spans(block, spans), changes


def _top_level_literals(block: str) -> dict[str, tuple[int, int, int, str]]:
    """``NAME = <literal>`` settings of a block: name -> (lineno, col, end_col, source)."""
    out = {}
    tree = parse_source(block)
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            value = stmt.value
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            value = stmt.value
        else:
            continue
        try:
            ast.literal_eval(value)
        except ValueError:
            continue
        if value.lineno != value.end_lineno:
            continue
        name = stmt.targets[0].id if isinstance(stmt, ast.Assign) else stmt.target.id
        src = block.splitlines()[value.lineno - 1].encode()[value.col_offset:value.end_col_offset].decode()
        out[name] = (value.lineno, value.col_offset, value.end_col_offset, src)
    return out


def crossover_block(block: str, partner_block: str, rng: random.Random) -> tuple[str, list[str]]:
    """Copy a random non-empty subset of the partner's differing top-level settings into ``block``."""
    ours, theirs = _top_level_literals(block), _top_level_literals(partner_block)
    differing = sorted(n for n in ours if n in theirs and ours[n][3] != theirs[n][3])
    if not differing:
        return block, []
    taken = [n for n in differing if rng.random() < 0.5] or [rng.choice(differing)]
    spans = [(*ours[n][:3], theirs[n][3]) for n in taken]
    return _replace_spans(block, spans), [f"{n} = {theirs[n][3]} (was {ours[n][3]})" for n in taken]


@dataclass(frozen=True)
class OfflineMutator:
    """Deterministic LLM-free mutator with the same result shape as an LLM proposal."""

    seed: int = 0
    crossover_rate: float = 0.3
    max_changes: int = 2
    sigma: float = 0.35

    def propose(self, parent_code: str, partner_code: str | None = None, key: int | str = 0,
                step_scale: float = 1.0) -> MutationResult:
        """Mutate ``parent_code``; with ``partner_code``, sometimes recombine with it.

        ``key`` (e.g. the iteration) selects the random stream: same seed + key, same child.
        ``step_scale`` widens the perturbation (the loop does when small steps only find code
        the archive already holds).
        """
        # String seeds hash with SHA-512, so this does not depend on PYTHONHASHSEED.
        rng = random.Random(f"offline/{self.seed}/{key}")
        block = split_candidate(parent_code).block
        try:
            if partner_code is not None and rng.random() < self.crossover_rate:
                new_block, changes = crossover_block(block, split_candidate(partner_code).block, rng)
                if changes:
                    return self._result(parent_code, new_block, "crossover", "crossover: " + "; ".join(changes))
            new_block, changes = perturb_block(block, rng, self.max_changes, self.sigma * step_scale)
        except SyntaxError as exc:
            return MutationResult(code=None, error=f"cannot parse the EVOLVE block: {exc}", kind="perturb", summary="")
        if not changes:
            return MutationResult(code=None, error="no tunable numeric constants in the EVOLVE block",
                                  kind="perturb", summary="")
        return self._result(parent_code, new_block, "perturb", "perturb: " + "; ".join(changes))

    def proposal(self, parent_code: str, partner_code: str | None = None, key: int | str = 0) -> Proposal:
        """The same mutation wrapped like an LLM proposal (model "offline", zero usage)."""
        result = self.propose(parent_code, partner_code, key)
        return Proposal(result=result, model="offline", usage=Usage(), turns=0, replies=())

    @staticmethod
    def _result(parent_code: str, new_block: str, kind: str, summary: str) -> MutationResult:
        result = apply_rewrite(parent_code, new_block, summary)  # same syntax/no-op checks as LLM replies
        return dataclasses.replace(result, kind=kind, repairable=False)
