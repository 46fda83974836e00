"""The agent's tools: JSON schemas (from pydantic models that reject unknown keys) and handlers.

Every handler works on the run's archive and scorer exactly as the loop does: code is applied
to the candidate being edited with the loop's edit rules (SEARCH/REPLACE or whole EVOLVE
block), scored by the same ``CodeScorer`` (sandboxed unless the run says otherwise),
committed with the loop's ``commit_child`` (numerics audit and held-out cascade included) and checkpointed by
the loop's rules. A bad call never raises out of :meth:`Workbench.call`: it comes back as a
tool error the model reads and can fix.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adrs import review
from adrs.agent.context import trim
from adrs.archive.store import Archive
from adrs.config import RunConfig
from adrs.evaluate import CodeScorer
from adrs.llm.client import ToolCall
from adrs.commit import Child, code_hash, commit_child, maybe_checkpoint, rescore_entry
from adrs.mutation import MutationResult, apply_edits, apply_rewrite, extract_rewrite, parse_edit_blocks
from adrs.prompts import format_score
from evaluator.candidate import CandidateFormatError, split_candidate
from evaluator.scoring import ScoreReport

DETAILS_CHARS = 1500
CURRENT = "current"


class ToolError(Exception):
    """A call the model can fix: its message is the tool result."""


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScoreArgs(_Args):
    code: str = Field(description=(
        "the change to the candidate being edited: SEARCH/REPLACE blocks against its EVOLVE block, "
        "or the complete new EVOLVE block (or whole file; only its EVOLVE block is taken)"))
    summary: str = Field("", description="one line: what this version changes and why")
    parent: str | None = Field(None, description="candidate to edit instead of the current one (id, iteration or 'best')")


class FaithfulArgs(_Args):
    code: str | None = Field(None, description="a change as for score(); it is scored and committed first. Omit to use `candidate`")
    candidate: str = Field(CURRENT, description="candidate to score faithfully when no code is given")
    summary: str = Field("", description="one line for the commit when code is given")


class ShowArgs(_Args):
    candidate: str = Field(CURRENT, description="id (c000012), iteration (12), 'best' or 'current'")


class DiffArgs(_Args):
    a: str = Field(description="the older candidate")
    b: str = Field(CURRENT, description="the newer candidate")


class LeaderboardArgs(_Args):
    top: int = Field(10, ge=1, le=50, description="how many rows")


class NotesArgs(_Args):
    pass


class RevertArgs(_Args):
    candidate: str = Field(description="the earlier candidate to continue from")


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    args: type[_Args]

    def schema(self) -> dict[str, Any]:
        """The chat-completions ``tools`` entry."""
        params = self.args.model_json_schema()
        params.pop("title", None)
        params.setdefault("properties", {})
        return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": params}}


SPECS: tuple[ToolSpec, ...] = (
    ToolSpec("score", "Apply a change to the current candidate, score it (fast: per-layer error on cached activations) "
             "and commit it as a new candidate, which becomes the current one. Returns scores, per-layer error and "
             "density, the worst record, and whether it is a new best.", ScoreArgs),
    ToolSpec("faithful_score", "Faithful score: the model decodes with the masker's selections in every layer "
             "(errors compound; needle accuracy, agreement and KL against dense decoding). Slow: use on promising "
             "candidates.", FaithfulArgs),
    ToolSpec("show", "A candidate's EVOLVE block, scores, per-layer error and density, worst record, held-out "
             "and faithful results.", ShowArgs),
    ToolSpec("diff", "Unified diff between two candidates' code.", DiffArgs),
    ToolSpec("leaderboard", "The best candidates of the run by combined score.", LeaderboardArgs),
    ToolSpec("notes", "Review checkpoints and the human reviewers' decisions and notes.", NotesArgs),
    ToolSpec("revert", "Continue from an earlier candidate: it becomes the current one that score() edits.", RevertArgs),
)
TOOL_SCHEMAS: list[dict[str, Any]] = [s.schema() for s in SPECS]
BY_NAME = {s.name: s for s in SPECS}


@dataclass(frozen=True)
class ToolOutcome:
    """A tool's result text (already trimmed) and what it did."""

    text: str
    ok: bool
    candidate: str | None = None  # a candidate it committed


def _data(text: str, limit: int = DETAILS_CHARS) -> str:
    """Candidate-controlled text (tracebacks, prints) as inert data: control characters out, fences broken, trimmed."""
    clean = "".join(ch if ch in "\n\t" or (ch.isprintable()) else "?" for ch in text)
    return "```text\n" + trim(clean.replace("```", "'''"), limit) + "\n```"


def apply_code(parent_code: str, code: str, summary: str) -> MutationResult:
    """The loop's edit rules on a tool argument: SEARCH/REPLACE blocks, a fenced block, or bare code."""
    edits, parse_error = parse_edit_blocks(code)
    if parse_error:
        return MutationResult(None, parse_error, "diff", summary, repairable=True)
    if edits:
        return apply_edits(parent_code, edits, summary)
    fenced = extract_rewrite(code) if "```" in code else None
    return apply_rewrite(parent_code, fenced or code, summary)


def _evolve_block(code: str) -> str:
    try:
        return split_candidate(code).block
    except CandidateFormatError:
        return code


@dataclass
class Workbench:
    """The agent's view of the run: the archive, the scorer, and the candidate being edited."""

    archive: Archive
    scorer: CodeScorer
    cfg: RunConfig
    current: str
    model: str = ""
    max_output_chars: int = 6000
    # Code hash -> candidate id: identical code is answered from the archive, not re-scored.
    known: dict[str, str] = field(default_factory=dict)
    # Set by the session before each call: what produced the call, kept in the candidate's record.
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.known:
            self.known = {code_hash(self.archive.code(r.id)): r.id for r in self.archive.all()}

    # -- dispatch ----------------------------------------------------------------------------
    async def call(self, call: ToolCall) -> ToolOutcome:
        """Run one tool call; malformed, unknown or failing calls become error results."""
        spec = BY_NAME.get(call.name)
        if spec is None:
            return self._error(f"unknown tool {call.name!r}; the tools are: {', '.join(BY_NAME)}")
        try:
            raw = json.loads(call.arguments or "{}")
        except json.JSONDecodeError as exc:
            return self._error(f"the arguments of {call.name} are not valid JSON ({exc.msg} at char {exc.pos}); "
                               f"send one JSON object with the keys {sorted(spec.args.model_fields)}")
        if not isinstance(raw, dict):
            return self._error(f"the arguments of {call.name} must be a JSON object, got {type(raw).__name__}")
        try:
            args = spec.args.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'arguments'}: {e['msg']}" for e in exc.errors())
            return self._error(f"invalid arguments for {call.name}: {problems}")
        code = getattr(args, "code", None)
        if code is not None and len(code) > self.cfg.agent.max_code_chars:
            return self._error(f"the code is {len(code)} characters, over the limit of {self.cfg.agent.max_code_chars}; "
                               "send SEARCH/REPLACE edits or a shorter EVOLVE block")
        handler: Callable[[Any, ToolCall], Awaitable[ToolOutcome]] = getattr(self, f"_tool_{call.name}")
        try:
            out = await handler(args, call)
        except ToolError as exc:
            return self._error(str(exc))
        return ToolOutcome(trim(out.text, self.max_output_chars), out.ok, out.candidate)

    def _error(self, message: str) -> ToolOutcome:
        return ToolOutcome(trim(f"error: {message}", self.max_output_chars), False)

    def resolve(self, name: str) -> str:
        """A candidate id from 'current', 'best', an id, an iteration or a commit prefix."""
        if name.strip().lower() == CURRENT:
            return self.current
        key: str | int = name.strip()
        if isinstance(key, str) and key.isdigit():
            key = int(key)
        try:
            return self.archive.get(key).id
        except (KeyError, LookupError) as exc:
            raise ToolError(f"no candidate {name!r} ({exc}); leaderboard() lists them") from None

    # -- tools -------------------------------------------------------------------------------
    async def _tool_score(self, args: ScoreArgs, call: ToolCall) -> ToolOutcome:
        ref_id, text = await self._commit_code(args.code, args.summary, args.parent, call)
        return ToolOutcome(text, True, ref_id)

    async def _commit_code(self, code: str, summary: str, parent: str | None, call: ToolCall) -> tuple[str, str]:
        parent_id = self.resolve(parent or CURRENT)
        parent_ref = self.archive.get(parent_id)
        mutation = apply_code(self.archive.code(parent_id), code, summary)
        if mutation.code is None:
            raise ToolError(f"the change could not be applied to {parent_id}; nothing was scored:\n{mutation.error}")
        known = self.known.get(code_hash(mutation.code))
        if known is not None:
            self.current = known
            return known, (f"this exact code is already candidate {known}; not scored again. "
                           f"Current candidate is now {known}.\n\n" + self._score_text(known))
        report: ScoreReport = await asyncio.to_thread(self.scorer.score, mutation.code)
        before = self.archive.best()
        llm = {"model": self.model, "mode": "agent", "tool_call_id": call.id, **self.provenance.get("llm", {})}
        child = Child(parent_id, parent_ref.island, mutation.code, report, mutation, llm=llm,
                      prompt=self.provenance.get("prompt"), response=self.provenance.get("response"),
                      transcript=tuple(self.provenance.get("transcript", ())))
        # The archive's SQLite connection belongs to this thread: commit here, not in a worker thread.
        ref, rejection = commit_child(self.archive, self.scorer, child, author="model",
                                      summary=summary or mutation.summary or "agent edit")
        self.known[code_hash(mutation.code)] = ref.id
        best = self.archive.best()
        became_best = best is not None and best.id == ref.id and (before is None or before.id != ref.id)
        maybe_checkpoint(self.archive, self.cfg, ref, became_best)
        self.current = ref.id
        head = f"{ref.id} (child of {parent_id}) committed. Current candidate is now {ref.id}."
        if became_best:
            prev = f"{before.id}: {before.combined_score:.5f}" if before else "none"
            head += f" NEW BEST (previous best {prev})."
        elif best is not None:
            head += f" Best remains {best.id} ({best.combined_score:.5f})."
        if rejection:
            head += f"\nRejected by the held-out check: {rejection}"
        if mutation.notes:
            head += "\nNote: " + "; ".join(mutation.notes)
        return ref.id, head + "\n\n" + self._score_text(ref.id)

    def _score_text(self, cid: str) -> str:
        ref = self.archive.get(cid)
        record = self.archive.record(cid)
        if not record.get("valid"):
            text = f"{cid}: FAILED ({record.get('category') or 'failure'}): {record.get('reason') or 'no reason'}"
            if record.get("details"):
                text += "\nDetails (output of the candidate):\n" + _data(str(record["details"]))
            return text
        status = f" [{ref.status}: {ref.reject_reason}]" if ref.status == "rejected" else ""
        return f"{cid}{status}: " + format_score(record)

    async def _tool_faithful_score(self, args: FaithfulArgs, call: ToolCall) -> ToolOutcome:
        from evaluator.faithful.spec import faithful_preset_for, resolve_faithful_spec

        head, committed = "", None
        if args.code is not None:
            committed, head = await self._commit_code(args.code, args.summary, None, call)
            head += "\n\n"
        cid = committed or self.resolve(args.candidate)
        preset = self.cfg.agent.faithful_workload
        if preset is None:
            workload = self.cfg.workload if isinstance(self.cfg.workload, str) else "default"
            try:
                preset = faithful_preset_for(workload)
            except ValueError as exc:
                raise ToolError(f"no faithful preset for this run's workload ({exc}); set agent.faithful_workload") from None
        report = await asyncio.to_thread(self.scorer.faithful, self.archive.code(cid), preset)
        data = report.to_dict()
        self.archive.add_rescore(cid, rescore_entry(data, resolve_faithful_spec(preset).content_hash(), "faithful"))
        if not report.valid:
            text = f"faithful score of {cid} on {preset}: FAILED ({report.category}): {report.reason}"
            if data.get("details"):
                text += "\n" + _data(str(data["details"]))
            return ToolOutcome(head + text, True, committed)
        keys = ("combined_score", "error", "density", "agreement", "kl", "kl_max", "needle_accuracy", "dense_needle_accuracy")
        lines = [f"faithful score of {cid} on {preset} (sparse decode in every layer):"]
        lines += [f"  {k} = {data[k]:.5g}" if isinstance(data.get(k), float) else f"  {k} = {data.get(k)}"
                  for k in keys if data.get(k) is not None]
        return ToolOutcome(head + "\n".join(lines), True, committed)

    async def _tool_show(self, args: ShowArgs, call: ToolCall) -> ToolOutcome:
        cid = self.resolve(args.candidate)
        ref = self.archive.get(cid)
        record = self.archive.record(cid)
        lines = [f"{cid}: iteration {ref.iteration}, author {ref.author}, parent {ref.parent_id or '-'}, "
                 f"status {ref.status}" + (f" ({ref.reject_reason})" if ref.reject_reason else "")
                 + (" [current]" if cid == self.current else ""),
                 f"summary: {ref.summary or '-'}", "", self._score_text(cid)]
        if record.get("heldout"):
            held = record["heldout"]
            lines.append(f"\nheld-out: combined_score {held.get('combined_score')}, valid {held.get('valid')}")
        for note in self.archive.rescores(cid):
            rep = note.get("report") or {}
            lines.append(f"re-score ({note.get('why')}): combined_score {rep.get('combined_score')}, valid {rep.get('valid')}"
                         + (f", needle_accuracy {rep['needle_accuracy']}" if rep.get("needle_accuracy") is not None else ""))
        lines += ["", "EVOLVE block:", "```python", _evolve_block(self.archive.code(cid)).strip("\n"), "```"]
        return ToolOutcome("\n".join(lines), True)

    async def _tool_diff(self, args: DiffArgs, call: ToolCall) -> ToolOutcome:
        a, b = self.archive.get(self.resolve(args.a)), self.archive.get(self.resolve(args.b))
        text = self.archive.repo.git.diff(a.commit, b.commit, "--", "candidate.py")
        return ToolOutcome(f"diff {a.id} -> {b.id}:\n" + (text or "(identical code)"), True)

    async def _tool_leaderboard(self, args: LeaderboardArgs, call: ToolCall) -> ToolOutcome:
        rows = self.archive.leaderboard(args.top)
        every = self.archive.all()
        failed = sum(1 for r in every if r.status == "failed")
        lines = [f"{len(every)} candidates ({failed} failed); current: {self.current}",
                 "rank | id | combined_score | error | density | author | summary"]
        for i, r in enumerate(rows, 1):
            lines.append(f"{i} | {r.id} | {r.combined_score:.5f} | {r.error:.4f} | {r.density:.4f} | {r.author} | "
                         f"{(r.summary or '')[:60]}")
        return ToolOutcome("\n".join(lines), True)

    async def _tool_notes(self, args: NotesArgs, call: ToolCall) -> ToolOutcome:
        every = review.checkpoints(self.archive)
        if not every:
            return ToolOutcome("no review checkpoints and no notes yet", True)
        lines = []
        for c in every:
            lines.append(f"{c.name} on {c.candidate_id} ({c.reason}): {c.decision or 'pending review'}")
            lines += [f"  note: {n}" for n in c.notes]
        return ToolOutcome("\n".join(lines), True)

    async def _tool_revert(self, args: RevertArgs, call: ToolCall) -> ToolOutcome:
        cid = self.resolve(args.candidate)
        self.current = cid
        shown = await self._tool_show(ShowArgs(candidate=cid), call)
        return ToolOutcome(f"Current candidate is now {cid}; score() edits it from here.\n\n{shown.text}", True)
