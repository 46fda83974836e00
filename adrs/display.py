"""The live view of a run: one rich table redrawn as candidates land."""
from __future__ import annotations

import time
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from adrs.loop import Event, LoopStats
from adrs.safetext import terminal_safe


def _trend(history: list[float]) -> str:
    if len(history) < 2:
        return ""
    delta = history[-1] - history[max(0, len(history) - 10)]
    return f"(+{delta:.4f} over last {min(10, len(history) - 1)})" if delta > 0 else "(flat)"


def render(stats: LoopStats, last: list[str], total: int, done: int) -> Group:
    """Summary table plus the last few candidate lines."""
    minutes = max((time.time() - stats.started) / 60, 1e-9)
    table = Table(show_header=False, box=None)
    best = stats.best_history[-1] if stats.best_history else None
    table.add_row("iteration", f"{done}/{total}")
    table.add_row("best score", f"{best:.5f} {_trend(stats.best_history)}" if best is not None else "-")
    table.add_row("in flight", str(stats.in_flight))
    table.add_row("evals/min", f"{stats.committed / minutes:.1f}")
    table.add_row("failures", ", ".join(f"{k}: {v}" for k, v in sorted(stats.failures.items())) or "none")
    table.add_row("tokens / cost", f"{stats.tokens} / ${stats.cost_usd:.4f}")
    table.add_row("sandbox", Text(stats.isolation or "- (no candidate scored yet)",
                                  style="bold red" if (stats.isolation or "").startswith("NOT") else ""))
    return Group(table, Text("\n".join(last[-8:])))


def candidate_line(event: Event) -> str:
    """One line per committed candidate."""
    ref, rep = event["ref"], event["report"]
    if rep.valid:
        text = f"#{ref.iteration:<4} {ref.status:8} score {rep.combined_score:.5f} err {rep.error:.4f} dens {rep.density:.4f}"
        if rep.speedup is not None:
            text += f" x{rep.speedup:.2f}"
    else:
        text = f"#{ref.iteration:<4} failed   {rep.category}: {terminal_safe((rep.reason or '')[:70], markup=False)}"
    if event.get("rejection"):
        text += f"  [flagged: {terminal_safe(event['rejection'], markup=False)}]"
    best: Any = event.get("best")
    if best is not None and best.id == ref.id:
        text += "  NEW BEST"
    return text
