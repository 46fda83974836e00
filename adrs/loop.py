"""The evolution loop: pick a parent, propose a mutation, score it, commit it; repeat.

Every candidate is committed to the archive as soon as it is scored, so a killed run loses
only work in flight, and `resume` continues from what was committed. Iteration numbers are
assigned at commit time under the archive's lock: no gaps, no duplicates.

The LLM-free mutators (offline, structural) keep ``W = evaluation.in_flight`` proposals in
flight and still replay exactly: the child that becomes iteration ``i`` picks its parent
from the archive as it stood at iteration ``i - W`` (which is always committed by then),
avoids the code of every earlier iteration (committed or in flight), and children are
committed in iteration order, whatever order their scores arrive in. So the archive is a
deterministic function of seed, config and ``W``, across resumes too. LLM proposals commit
as they land (an LLM is not deterministic anyway).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from adrs import review
from adrs.archive import open_run
from adrs.archive.store import Archive
from adrs.commit import (Child, CheckResult, archived_hashes, code_hash, commit_checked, ensure_seed, maybe_checkpoint,
                         plan_checks, run_checks)
from adrs.config import RunConfig, dump_config
from adrs.evaluate import CodeScorer
from adrs.llm.budget import BudgetExceeded
from adrs.llm.client import LLMError
from adrs.mutation import MutationResult
from adrs.offline import OfflineMutator
from adrs.structural import StructuralMutator
from adrs.parents import ParentRecord, apply_migration, plan_migration, select_parent, should_migrate
from evaluator.scoring import ScoreReport

Event = dict[str, Any]
MAX_CONSECUTIVE_LLM_FAILURES = 5
OFFLINE_DRAWS = 8  # tries for an offline child whose code is not archived yet


@dataclass
class LoopStats:
    """What the live display shows; updated as candidates land."""

    started: float = field(default_factory=time.time)
    committed: int = 0
    in_flight: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    best_history: list[float] = field(default_factory=list)
    tokens: int = 0
    cost_usd: float = 0.0
    isolation: str | None = None  # the sandbox level of the latest scored candidate, in words


def island_view(rows: list[Any], iteration: int, cfg: RunConfig) -> list[ParentRecord]:
    """Archive rows as selection records, with every migration up to ``iteration`` replayed.

    Migrations are recomputed from the archive rather than stored, so they survive resume
    and a replay reaches the same islands.
    """
    ordered = sorted(rows, key=lambda r: r.iteration)
    view: list[ParentRecord] = []
    taken = 0
    for point in range(1, iteration + 1):
        if not should_migrate(point, cfg.selection):
            continue
        while taken < len(ordered) and ordered[taken].iteration < point:
            view.append(_parent_record(ordered[taken]))
            taken += 1
        view = apply_migration(view, plan_migration(view, cfg.selection))
    view.extend(_parent_record(r) for r in ordered[taken:])
    return view


def _parent_record(row: Any) -> ParentRecord:
    return ParentRecord(
        id=row.id, island=row.island, combined_score=row.combined_score, error=row.error,
        density=row.density, valid=row.status == "valid",
    )


class Proposer:
    """Turns (parent, inspirations) into a child: an LLM-free mutator (offline, structural) or an LLM."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.offline: OfflineMutator | StructuralMutator = (
            StructuralMutator(seed=cfg.seed, density_target=cfg.density_target) if cfg.llm == "structural"
            else OfflineMutator(seed=cfg.seed))
        self.client = None
        if cfg.llm not in ("offline", "structural"):
            from adrs.llm.client import LLMClient

            self.client = LLMClient(cfg.llm, seed=cfg.seed)

    def max_in_flight(self, window: int) -> int:
        return window if self.client is None else self.cfg.llm.max_in_flight

    def propose_offline(self, archive: Archive, choice: Any, key: int, seen: set[str]) -> MutationResult:
        """An LLM-free child of ``choice``: a function of the seed, ``key`` and the archived code it reads."""
        parent_code = archive.code(choice.parent_id)
        partner = archive.code(choice.top_ids[0]) if choice.top_ids else None
        # Random perturbations often land on code already archived; other draws (still a
        # function of seed and key, so replays match), with ever wider steps once the
        # neighbourhood is used up, are cheaper than a re-evaluation.
        for attempt in range(OFFLINE_DRAWS):
            result = self.offline.propose(parent_code, partner, key=f"{key}/{attempt}" if attempt else key,
                                          step_scale=1.0 + attempt)
            if result.code is None or code_hash(result.code) not in seen:
                break
        return result

    async def propose(self, archive: Archive, choice: Any, key: int, notes: list[str],
                      seen: set[str]) -> tuple[MutationResult, dict | None, str | None, str | None, tuple[dict[str, Any], ...]]:
        """An LLM child of ``choice``: the mutation, usage, prompt, reply and conversation."""
        parent_code = archive.code(choice.parent_id)
        from adrs.llm.proposal import propose
        from adrs.prompts import render_prompt

        def insp(ids: tuple[str, ...]) -> list[dict[str, Any]]:
            return [archive.record(i) | {"id": i, "code": archive.code(i)} for i in ids]

        failed = [c.id for c in archive.all() if c.parent_id == choice.parent_id and c.status == "failed"]
        failures = [archive.record(cid) for cid in failed[-3:]]  # read only the records the prompt shows
        prompt = render_prompt(
            parent_code, archive.record(choice.parent_id), parent_id=choice.parent_id,
            density_target=self.cfg.density_target, objective=self.cfg.objective,
            speedup_target=self.cfg.speedup_target, failures=failures, top=insp(choice.top_ids),
            diverse=insp(choice.diverse_ids), notes=notes,
        )
        proposal = await propose(self.client, prompt.system, prompt.user, parent_code)
        usage = proposal.usage
        llm = {"model": proposal.model, "turns": proposal.turns, "usage": {
            "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens, "cost_usd": usage.cost_usd}}
        return (proposal.result, llm, prompt.system + "\n\n" + prompt.user, "\n\n---\n\n".join(proposal.replies),
                proposal.messages)


def _choose(archive: Archive, cfg: RunConfig, slot: int, horizon: int | None) -> Any:
    """The parent (and inspirations) of the child for ``slot``, from the rows up to iteration ``horizon`` (None: all)."""
    rows = [r for r in archive.all() if horizon is None or r.iteration <= horizon]
    return select_parent(island_view(rows, slot, cfg), slot, cfg.selection, cfg.seed)


async def _make_child(archive: Archive, cfg: RunConfig, scorer: CodeScorer, proposer: Proposer, slot: int,
                      notes: list[str], seen: set[str]) -> Child:
    """An LLM child: proposed against the archive as it is now, then scored."""
    choice = _choose(archive, cfg, slot, None)
    mutation, llm, prompt, response, transcript = await proposer.propose(archive, choice, slot, notes, seen)
    return await _score_child(archive, scorer, choice, mutation, seen, llm, prompt, response, transcript)


async def _score_child(archive: Archive, scorer: CodeScorer, choice: Any, mutation: MutationResult, seen: set[str],
                       llm: dict | None = None, prompt: str | None = None, response: str | None = None,
                       transcript: tuple[dict[str, Any], ...] = ()) -> Child:
    if mutation.code is None:
        report = ScoreReport.failure("mutation", mutation.error or "the reply could not be applied")
        code = archive.code(choice.parent_id)  # recorded with its parent's code
    elif code_hash(mutation.code) in seen:
        # Recorded (so the model's history shows it) but not evaluated: its score is known.
        report = ScoreReport.failure("mutation", "duplicate: this exact code is already in the archive; not evaluated")
        code = mutation.code
    else:
        code = mutation.code
        report = await asyncio.to_thread(scorer.score, code)
    return Child(choice.parent_id, choice.island, code, report, mutation, llm, prompt, response, transcript)


async def evolve(
    run_dir: Path, cfg: RunConfig, scorer: CodeScorer, iterations: int | None = None,
    on_event: Callable[[Event], None] | None = None, base: Path = Path("."),
) -> LoopStats:
    """Run until the archive holds ``1 + iterations`` candidates (seed included) or the budget ends."""
    emit = on_event or (lambda e: None)
    stats = LoopStats()
    with open_run(run_dir, create=True) as archive:
        if cfg.evaluation.in_flight is None:  # fixed once, in the run's config, so resumes replay alike
            cfg = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"in_flight": scorer.slots()})})
        if not archive.config_path.exists():
            archive.config_path.write_text(dump_config(cfg))
        archive.recover()
        ensure_seed(archive, cfg, scorer, base)
        proposer = Proposer(cfg)
        window = proposer.max_in_flight(cfg.evaluation.in_flight)
        ordered = proposer.client is None  # LLM-free: commit in iteration order, see the module docstring
        total = 1 + (cfg.iterations if iterations is None else iterations)
        notes = review.prompt_notes(archive)
        _backfill_checkpoint(archive, cfg)
        paused = cfg.review.mode == "pause" and bool(review.pending(archive))
        pending: dict[asyncio.Task, int] = {}  # task -> the iteration its child will get
        ready: dict[int, Child] = {}  # scored children waiting for their turn to commit
        # One commit at a time, as a task: its checks (audit, held-out: sandboxed evaluations) run on a
        # thread while new proposals launch; its archive writes run here, on the loop's thread.
        committing: asyncio.Task | None = None
        next_key = 0  # LLM runs: the next proposal's key (keys stay unique when a failed proposal is retried)
        seen = archived_hashes(archive)
        in_flight_codes: dict[int, str] = {}  # LLM-free: code hashes of proposals not yet committed
        llm_failures = 0
        best = archive.best()
        if best is not None:  # a resumed run starts from what is archived, not from "no best yet"
            stats.best_history.append(best.combined_score)
        emit({"kind": "started", "stats": stats, "done": archive.next_iteration(), "total": total})
        try:
            while archive.next_iteration() < total or pending or ready or committing is not None:
                if paused and not pending and not ready and committing is None:
                    # In-flight work is committed first, so nothing is lost while waiting.
                    await _wait_for_review(archive, run_dir, emit)
                    notes = review.prompt_notes(archive)
                    paused = False
                while not paused and not _budget_done(proposer):
                    outstanding = _in_flight(pending, ready, committing)
                    if archive.next_iteration() + outstanding >= total:
                        break
                    if ordered:
                        # The slot keys the random streams and is the iteration the child will get.
                        if outstanding >= window:
                            break
                        slot = archive.next_iteration() + outstanding
                        task = _launch_offline(archive, cfg, scorer, proposer, slot, window, seen, in_flight_codes)
                    else:
                        # The window bounds proposals being requested or scored; a scored child waiting
                        # for its commit (an audit, say) holds no LLM slot. The slot is only a unique key.
                        if len(pending) >= window or outstanding >= 2 * window:
                            break
                        slot = next_key = max(next_key, archive.next_iteration() + outstanding)
                        next_key += 1
                        task = asyncio.create_task(_make_child(archive, cfg, scorer, proposer, slot, notes, seen))
                    pending[task] = slot
                if committing is None and ready:
                    # LLM children commit as they land; LLM-free ones in iteration order.
                    order = sorted(ready) if not ordered else _next_in_order(ready, archive.next_iteration())
                    if order:
                        child = ready.pop(order[0])
                        in_flight_codes.pop(order[0], None)
                        seen.add(code_hash(child.code))
                        committing = asyncio.create_task(_commit(archive, scorer, child, stats, emit))
                if not pending and committing is None:
                    break
                stats.in_flight = _in_flight(pending, ready, committing)
                waiting = set(pending) | ({committing} if committing is not None else set())
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if committing in done:
                    task, committing = committing, None
                    checkpoint = task.result()  # a failed commit ends the run, as it always did
                    if checkpoint and cfg.review.mode == "pause" and archive.next_iteration() < total:
                        paused = True
                # Every finished task's outcome is read before acting on any: an exception left
                # unread is logged when the task is garbage-collected, and on CPython 3.11 that
                # traceback formatting inside the collector can break a concurrent ast.parse.
                outcomes = [(task, pending.pop(task), task.exception()) for task in done if task in pending]
                stats.in_flight = _in_flight(pending, ready, committing)
                for task, slot, exc in outcomes:
                    if isinstance(exc, BudgetExceeded):
                        emit({"kind": "budget", "message": f"budget reached: {exc}; finishing in-flight work"})
                    elif isinstance(exc, LLMError):
                        # An endpoint outage is not the candidate's fault: nothing is committed,
                        # the slot is retried, and a run that cannot reach its LLM stops cleanly.
                        llm_failures += 1
                        emit({"kind": "llm_error", "message": f"LLM call failed: {exc}"})
                        if llm_failures >= MAX_CONSECUTIVE_LLM_FAILURES:
                            raise LLMError(f"{llm_failures} LLM calls failed in a row (last: {exc}); "
                                           f"fix the endpoint and run `adrs resume {run_dir}`") from exc
                    elif exc is not None:
                        raise exc
                    else:
                        llm_failures = 0
                        ready[slot] = task.result()
                stats.in_flight = _in_flight(pending, ready, committing)
        finally:
            for task in pending:
                task.cancel()
            if pending:  # abandoned proposals: collect their outcomes so none is left unread
                await asyncio.gather(*pending, return_exceptions=True)
            if committing is not None:  # a scored child is not thrown away: its commit finishes
                await asyncio.gather(committing, return_exceptions=True)
    stats.in_flight = 0
    emit({"kind": "finished", "stats": stats})
    return stats


def _launch_offline(archive: Archive, cfg: RunConfig, scorer: CodeScorer, proposer: Proposer, slot: int,
                    window: int, seen: set[str], in_flight_codes: dict[int, str]) -> asyncio.Task:
    """Propose the LLM-free child that becomes iteration ``slot`` now, and start scoring it.

    It reads only what is certain by now whatever the timing: the archive up to iteration
    ``slot - window`` for its parent, and every earlier iteration's code (archived or in
    flight) to avoid duplicates. That makes it a function of seed, config and window alone.
    """
    choice = _choose(archive, cfg, slot, max(0, slot - window))
    earlier = seen | set(in_flight_codes.values())
    mutation = proposer.propose_offline(archive, choice, slot, earlier)
    if mutation.code is not None:
        in_flight_codes[slot] = code_hash(mutation.code)
    return asyncio.create_task(_score_child(archive, scorer, choice, mutation, earlier))


def _in_flight(pending: dict[asyncio.Task, int], ready: dict[int, Child], committing: asyncio.Task | None) -> int:
    """Children proposed but not yet in the archive: scoring, scored, or being committed."""
    return len(pending) + len(ready) + (committing is not None)


def _next_in_order(ready: dict[int, Child], next_iteration: int) -> list[int]:
    """The run of consecutive iterations, from the next one to commit, that are ready."""
    run = []
    while next_iteration + len(run) in ready:
        run.append(next_iteration + len(run))
    return run


def _budget_done(proposer: Proposer) -> bool:
    return proposer.client is not None and proposer.client.budget.exhausted


REVIEW_POLL_S = 1.0


async def _wait_for_review(archive: Archive, run_dir: Path, emit: Callable[[Event], None]) -> None:
    """Block (without blocking the event loop) until no checkpoint is pending."""
    waiting = review.pending(archive)
    if waiting:
        c = waiting[0]
        emit({"kind": "paused", "message": (
            f"paused at {c.name} ({c.reason}). Decide with `adrs review {run_dir} approve` "
            f"(or `reject REASON`); the run continues then. Or Ctrl-C now and `adrs resume {run_dir}` later.")})
    while review.pending(archive):
        await asyncio.sleep(REVIEW_POLL_S)
    if waiting:
        emit({"kind": "resumed", "message": "review decided; continuing"})


def _backfill_checkpoint(archive: Archive, cfg: RunConfig) -> None:
    """Make the checkpoint a run killed between commit and tag would have made."""
    last = archive.next_iteration() - 1
    if last <= 0:
        return
    ref = archive.get(last)
    best = archive.best()
    maybe_checkpoint(archive, cfg, ref, best is not None and best.id == ref.id)


async def _commit(archive: Archive, scorer: CodeScorer, child: Child, stats: LoopStats,
                  emit: Callable[[Event], None]) -> review.Checkpoint | None:
    """Check and commit one child; its checkpoint, if it made one. Reads and writes the archive on
    the loop's thread only; nothing else commits meanwhile, so the plan still holds at the write."""
    before = archive.best()
    plan = plan_checks(archive, scorer, child)
    checks = await asyncio.to_thread(run_checks, scorer, child, plan) if plan.audit or plan.cascade else CheckResult()
    ref, rejection = commit_checked(archive, scorer, child, plan, checks)
    stats.committed += 1
    if getattr(child.report, "isolation", None):
        stats.isolation = child.report.isolation
    if not child.report.valid:
        stats.failures[child.report.category] = stats.failures.get(child.report.category, 0) + 1
    if child.llm:
        stats.tokens += child.llm["usage"]["prompt_tokens"] + child.llm["usage"]["completion_tokens"]
        stats.cost_usd += child.llm["usage"]["cost_usd"]
    best = archive.best()
    if best is not None:
        stats.best_history.append(best.combined_score)
    emit({"kind": "candidate", "ref": ref, "report": child.report, "best": best, "rejection": rejection, "stats": stats})
    became_best = best is not None and best.id == ref.id and (before is None or before.id != ref.id)
    checkpoint = maybe_checkpoint(archive, scorer.config, ref, became_best)
    if checkpoint is not None:
        emit({"kind": "checkpoint", "message": f"checkpoint {checkpoint.name}: {checkpoint.reason}"})
    return checkpoint
