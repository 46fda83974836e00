"""What `adrs agent` and `adrs resume` (of an agent run) do once the CLI has a run directory and config."""
from __future__ import annotations

import asyncio
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from adrs.agent.session import AgentOutcome, run_agent
from adrs.config import RunConfig
from adrs.spend import run_spend


def run_session(run_dir: Path, cfg: RunConfig, turns: int | None, base: Path, out: Console) -> int:
    """Run the agent of ``run_dir`` with live event lines; returns the exit code (0, or 3 after an outage)."""
    from adrs.archive import open_run
    from adrs.evaluate import make_scorer

    scorer = make_scorer(cfg)

    def on_event(event: dict) -> None:
        out.print(escape(event.get("message", "")), highlight=False)  # tool results quote candidate text

    try:
        outcome: AgentOutcome = asyncio.run(run_agent(run_dir, cfg, scorer, turns=turns, on_event=on_event, base=base))
    except KeyboardInterrupt:
        out.print(f"stopped; the transcript and every candidate are kept. Resume with: adrs resume {run_dir}")
        return 130
    finally:
        scorer.close()
    with open_run(run_dir) as archive:
        spend = run_spend(archive)
    out.print(f"\nagent stopped after {outcome.turns} turn(s): {escape(outcome.reason)}", highlight=False)
    out.print(f"best: {outcome.best}; current: {outcome.current}. {spend.line()}")
    out.print(f"{outcome.resume_hint(run_dir)} [--turns N]; leaderboard: adrs leaderboard {run_dir}")
    return 0 if outcome.ok else 3
