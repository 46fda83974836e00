"""Turn a model's reply into a new candidate: SEARCH/REPLACE edits or a full EVOLVE-block rewrite.

Only the EVOLVE block of the parent may change; the scaffolding around it (imports, markers,
anything the evaluator relies on) is copied from the parent verbatim. Every failure comes back
as a short, specific message that can be sent to the model as a repair turn.
"""
from __future__ import annotations

import ast
import difflib
import re
from dataclasses import dataclass, field
from typing import Literal

from evaluator.candidate import CandidateFormatError, CandidateParts, compile_tree, parse_source, split_candidate
from evaluator.contract import ENTRY_POINT, EVOLVE_END, EVOLVE_START

MutationKind = Literal["diff", "rewrite", "perturb", "crossover", "human", "none"]

# Marker lines are matched loosely (models vary the number of <, = and >).
_SEARCH_RE = re.compile(r"^\s*<{5,}\s*SEARCH\s*$")
_DIVIDER_RE = re.compile(r"^\s*={5,}\s*$")
_REPLACE_RE = re.compile(r"^\s*>{5,}\s*REPLACE\s*$")
_FENCE_RE = re.compile(r"^\s*```\s*([\w+-]*)\s*$")
_SUMMARY_RE = re.compile(r"^\s*\**summary\**\s*:\s*\**\s*(.+?)\s*$", re.IGNORECASE)
_THINK_RE = re.compile(r"<think>.*?(</think>|\Z)", re.DOTALL | re.IGNORECASE)
SUMMARY_MAX_CHARS = 160


@dataclass(frozen=True)
class EditBlock:
    """One SEARCH/REPLACE pair, as written by the model."""

    search: str
    replace: str


@dataclass(frozen=True)
class MutationResult:
    """Outcome of applying one reply (or one offline mutation) to a parent.

    Exactly one of ``code`` (the full new candidate file) and ``error`` is set.
    ``repairable`` says whether sending ``error`` back to the model can help (a bad diff or
    syntax error can be fixed; a reply with no code at all is also worth one nudge).
    """

    code: str | None
    error: str | None
    kind: MutationKind
    summary: str
    repairable: bool = False
    n_edits: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return self.code is not None


def _fail(kind: MutationKind, error: str, summary: str = "", repairable: bool = True) -> MutationResult:
    return MutationResult(code=None, error=error, kind=kind, summary=summary, repairable=repairable)


# --------------------------------------------------------------------------- parsing


def parse_edit_blocks(reply: str) -> tuple[list[EditBlock], str | None]:
    """All SEARCH/REPLACE blocks in ``reply``, or an error for an unterminated one.

    Parsing is line based so that code containing ``=======`` inside strings elsewhere in the
    reply does not confuse a regex spanning the whole text.
    """
    blocks: list[EditBlock] = []
    lines = reply.splitlines()
    i = 0
    while i < len(lines):
        if not _SEARCH_RE.match(lines[i]):
            i += 1
            continue
        start = i
        i += 1
        search: list[str] = []
        while i < len(lines) and not _DIVIDER_RE.match(lines[i]):
            search.append(lines[i])
            i += 1
        if i >= len(lines):
            return blocks, f"SEARCH block starting at reply line {start + 1} has no '=======' divider"
        i += 1
        replace: list[str] = []
        while i < len(lines) and not _REPLACE_RE.match(lines[i]):
            replace.append(lines[i])
            i += 1
        if i >= len(lines):
            return blocks, f"SEARCH block starting at reply line {start + 1} has no '>>>>>>> REPLACE' line"
        i += 1
        blocks.append(EditBlock("\n".join(search), "\n".join(replace)))
    return blocks, None


def _code_fences(reply: str) -> list[tuple[str, str]]:
    """``(language, body)`` of each fenced code block; an unclosed last fence runs to the end."""
    fences: list[tuple[str, str]] = []
    lang: str | None = None
    body: list[str] = []
    for line in reply.splitlines():
        m = _FENCE_RE.match(line)
        if lang is None:
            if m:
                lang, body = m.group(1).lower(), []
        elif m and not m.group(1):
            fences.append((lang, "\n".join(body)))
            lang = None
        else:
            body.append(line)
    if lang is not None and body:
        fences.append((lang, "\n".join(body)))
    return fences


def extract_rewrite(reply: str) -> str | None:
    """The code of a full rewrite in ``reply`` (a fenced block, or bare code with markers).

    Preference: a fence containing the EVOLVE markers, else the longest python (or untagged)
    fence. Returns None when the reply carries no code.
    """
    fences = [body for lang, body in _code_fences(reply) if lang in ("", "python", "py", "python3")]
    with_markers = [b for b in fences if EVOLVE_START in b and EVOLVE_END in b]
    if with_markers:
        return max(with_markers, key=len)
    if fences:
        best = max(fences, key=len)
        return best if best.strip() else None
    if EVOLVE_START in reply and EVOLVE_END in reply:
        return reply
    return None


def extract_summary(reply: str) -> str:
    """A one-line description of the change: a ``Summary:`` line, else the first prose line."""
    in_fence = False
    first_prose = ""
    for line in reply.splitlines():
        if _FENCE_RE.match(line):
            in_fence = not in_fence
            continue
        if in_fence or _SEARCH_RE.match(line) or _DIVIDER_RE.match(line) or _REPLACE_RE.match(line):
            continue
        m = _SUMMARY_RE.match(line)
        if m:
            return m.group(1)[:SUMMARY_MAX_CHARS]
        text = line.strip().lstrip("#*-> ").strip()
        if text and not first_prose:
            first_prose = text
    return first_prose[:SUMMARY_MAX_CHARS]


# --------------------------------------------------------------------------- matching


def _indent_width(line: str) -> int:
    return len(line.expandtabs(4)) - len(line.expandtabs(4).lstrip())


def _reindent(lines: list[str], delta: int) -> list[str]:
    """Shift each non-blank line's indentation by ``delta`` columns (spaces)."""
    out = []
    for line in lines:
        if not line.strip():
            out.append("")
            continue
        width = max(0, _indent_width(line) + delta)
        out.append(" " * width + line.expandtabs(4).lstrip())
    return out


def _find_all(hay: list[str], needle: list[str], norm) -> list[int]:
    n = len(needle)
    target = [norm(x) for x in needle]
    return [i for i in range(len(hay) - n + 1) if [norm(x) for x in hay[i : i + n]] == target]


def _trim_blank_edges(lines: list[str]) -> list[str]:
    start, end = 0, len(lines)
    while start < end and not lines[start].strip():
        start += 1
    while end > start and not lines[end - 1].strip():
        end -= 1
    return lines[start:end]


def _closest_hint(block_lines: list[str], search_lines: list[str]) -> str:
    """Show the model the part of the block that most resembles its SEARCH text."""
    n = max(1, len(search_lines))
    target = "\n".join(x.strip() for x in search_lines)
    best_i, best_ratio = 0, -1.0
    for i in range(max(1, len(block_lines) - n + 1)):
        window = "\n".join(x.strip() for x in block_lines[i : i + n])
        ratio = difflib.SequenceMatcher(None, target, window).ratio()
        if ratio > best_ratio:
            best_i, best_ratio = i, ratio
    if best_ratio < 0.3:
        return ""
    snippet = "\n".join(block_lines[best_i : best_i + n])
    return f"The most similar text in the EVOLVE block (line {best_i + 1}) is:\n```\n{snippet}\n```"


def _drop_marker_lines(edit: EditBlock) -> EditBlock:
    """Models often quote the EVOLVE marker lines as anchors; they are scaffolding, so drop them."""
    def clean(text: str) -> str:
        return "\n".join(x for x in text.split("\n") if x.strip() not in (EVOLVE_START, EVOLVE_END))
    return EditBlock(clean(edit.search), clean(edit.replace))


def apply_edit(block: str, edit: EditBlock, scaffolding: str = "") -> tuple[str | None, str | None]:
    """Apply one edit to the EVOLVE block text: ``(new_block, None)`` or ``(None, error)``.

    Matching tries, in order: exact substring; lines equal up to trailing whitespace; lines
    equal up to indentation (the replacement is then re-indented by the same offset, so it
    takes the block's own indentation).
    """
    edit = _drop_marker_lines(edit)
    search = edit.search.strip("\n")
    if not search.strip():
        return None, "a SEARCH section is empty; copy the exact lines to replace from the EVOLVE block"
    count = block.count(search)
    if count == 1:
        return block.replace(search, edit.replace.strip("\n"), 1), None
    if count > 1:
        return None, (
            f"the SEARCH text matches {count} places in the EVOLVE block; include more surrounding "
            f"lines so it matches exactly one:\n```\n{search}\n```"
        )
    block_lines = block.splitlines()
    search_lines = _trim_blank_edges(search.splitlines())
    replace_lines = edit.replace.strip("\n").splitlines()
    for norm, shift in ((str.rstrip, False), (str.strip, True)):
        hits = _find_all(block_lines, search_lines, norm)
        if len(hits) > 1:
            return None, (
                f"the SEARCH text matches {len(hits)} places in the EVOLVE block (ignoring whitespace); "
                f"include more surrounding lines:\n```\n{search}\n```"
            )
        if len(hits) == 1:
            i = hits[0]
            new_lines = replace_lines
            if shift:
                # Indentation of the first non-blank line tells the offset between the
                # model's copy and the real block.
                first = next(j for j, x in enumerate(search_lines) if x.strip())
                delta = _indent_width(block_lines[i + first]) - _indent_width(search_lines[first])
                new_lines = _reindent(replace_lines, delta)
            out = block_lines[:i] + new_lines + block_lines[i + len(search_lines) :]
            return "\n".join(out) + ("\n" if block.endswith("\n") else ""), None
    if scaffolding and (search in scaffolding or _find_all(scaffolding.splitlines(), search_lines, str.strip)):
        return None, (
            "the SEARCH text is in the fixed scaffolding outside the EVOLVE block, which cannot change; "
            f"edit only code between '{EVOLVE_START}' and '{EVOLVE_END}':\n```\n{search}\n```"
        )
    hint = _closest_hint(block_lines, search_lines)
    msg = f"the SEARCH text was not found in the EVOLVE block:\n```\n{search}\n```"
    return None, msg + ("\n" + hint if hint else "")


# --------------------------------------------------------------------------- checks


def check_candidate(code: str) -> str | None:
    """Syntax and shape check before evaluation: None if fine, else a message for the model."""
    try:
        tree = parse_source(code)
        compile_tree(tree, "<candidate>")
    except SyntaxError as exc:
        line = (exc.text or "").rstrip()
        return f"syntax error at line {exc.lineno}: {exc.msg}" + (f"\n    {line}" if line else "")
    except ValueError as exc:  # e.g. null bytes
        return f"the code cannot be compiled: {exc}"
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    if ENTRY_POINT not in defined:
        return f"the candidate no longer defines a top-level function '{ENTRY_POINT}(inp)'"
    return None


def _finish(parts: CandidateParts, new_block: str, kind: MutationKind, summary: str, n_edits: int,
            notes: tuple[str, ...] = ()) -> MutationResult:
    if new_block.strip() == parts.block.strip():
        return _fail(kind, "the change leaves the EVOLVE block unchanged; propose a real modification", summary)
    code = parts.join(new_block)
    problem = check_candidate(code)
    if problem:
        return _fail(kind, problem, summary)
    return MutationResult(code=code, error=None, kind=kind, summary=summary or f"{kind} ({n_edits} edit(s))",
                          n_edits=n_edits, notes=notes)


# --------------------------------------------------------------------------- entry points


def apply_edits(parent_code: str, edits: list[EditBlock], summary: str = "") -> MutationResult:
    """Apply SEARCH/REPLACE edits in order; all must apply or none does."""
    parts = split_candidate(parent_code)
    scaffolding = parts.prefix + parts.suffix
    block = parts.block
    errors: list[str] = []
    for n, edit in enumerate(edits, 1):
        new, err = apply_edit(block, edit, scaffolding)
        if err:
            errors.append(f"edit {n} of {len(edits)}: {err}")
        else:
            block = new  # later edits see earlier ones, as the model wrote them in order
    if errors:
        return _fail("diff", "\n\n".join(errors), summary)
    return _finish(parts, block, "diff", summary, len(edits))


def _outside(parts: CandidateParts) -> tuple[str, str]:
    """The scaffolding text without the marker lines themselves."""
    before = parts.prefix.rstrip("\n").rsplit("\n", 1)
    after = parts.suffix.split("\n", 1)
    return (before[0] if len(before) == 2 else "").strip(), (after[1] if len(after) == 2 else "").strip()


def _differs(theirs: tuple[str, str], ours: tuple[str, str]) -> bool:
    """True when the reply carried scaffolding of its own that is not the parent's."""
    return any(t and t != o for t, o in zip(theirs, ours))


def apply_rewrite(parent_code: str, new_code: str, summary: str = "") -> MutationResult:
    """Replace the EVOLVE block with ``new_code``'s block (or with ``new_code`` itself if it has no markers).

    If the reply was a whole file whose scaffolding differs from the parent's, only its EVOLVE
    block is taken; the difference is noted, never applied.
    """
    parts = split_candidate(parent_code)
    notes: tuple[str, ...] = ()
    if EVOLVE_START in new_code or EVOLVE_END in new_code:
        try:
            theirs = split_candidate(new_code)
        except CandidateFormatError as exc:
            return _fail("rewrite", f"the rewritten code has broken EVOLVE markers: {exc}", summary)
        if _differs(_outside(theirs), _outside(parts)):
            notes = ("changes outside the EVOLVE block were ignored (the scaffolding is fixed)",)
        block = theirs.block
    else:
        block = new_code.strip("\n") + "\n"
    return _finish(parts, block, "rewrite", summary, 1, notes)


def strip_reasoning(reply: str) -> str:
    """Drop ``<think>...</think>`` sections of reasoning models: drafts there are not the answer."""
    stripped = _THINK_RE.sub("", reply)
    return stripped if stripped.strip() else reply


def apply_reply(parent_code: str, reply: str) -> MutationResult:
    """Parse a model reply and apply it to ``parent_code``.

    SEARCH/REPLACE blocks win when present; otherwise a fenced full rewrite; otherwise the
    reply is prose only and the result is an error ("no code").
    """
    reply = strip_reasoning(reply)
    summary = extract_summary(reply)
    edits, parse_error = parse_edit_blocks(reply)
    if parse_error:
        return _fail("diff", parse_error, summary)
    if edits:
        return apply_edits(parent_code, edits, summary)
    code = extract_rewrite(reply)
    if code is None:
        return _fail(
            "none",
            "no code: the reply contains neither SEARCH/REPLACE blocks nor a ```python block with the new EVOLVE block",
            summary,
        )
    return apply_rewrite(parent_code, code, summary)


def repair_message(result: MutationResult) -> str:
    """The user turn sent back to the model after a failed application."""
    return (
        "Your change could not be applied:\n\n"
        f"{result.error}\n\n"
        "Reply again with corrected SEARCH/REPLACE blocks (SEARCH must copy lines of the current "
        "EVOLVE block exactly) or with the complete new EVOLVE block in one ```python fence."
    )
