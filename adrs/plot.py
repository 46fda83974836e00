"""`adrs plot`: one PNG with the run's progress, its error/density trade-off and the best's lineage."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from adrs.archive.store import Archive

PLOT_EXTRA_HINT = "plots need matplotlib: pip install 'adrs[plot]'"
# Densities closer together than this share of the target are "all at the target": a scatter
# against density would be one vertical stripe, so the panel shows error against iteration.
FLAT_DENSITY = 0.02
# The score axis covers the band where progress happens: from this quantile of the scores down
# by a margin; lower outliers are drawn on the bottom edge and counted.
LOW_QUANTILE = 0.25
STYLE = {  # author -> (marker, colour, label)
    "seed": ("s", "tab:purple", "seed"),
    "model": ("o", "tab:blue", "model candidate"),
    "human": ("*", "tab:orange", "human patch"),
}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * (len(ordered) - 1))))]


def score_limits(scores: list[float]) -> tuple[float, float] | None:
    """y-limits that keep the progress band readable despite outliers far below it; None: autoscale."""
    if len(scores) < 5:
        return None
    top, low = max(scores), _quantile(scores, LOW_QUANTILE)
    span = max(top - low, 1e-9)
    bottom = low - 0.5 * span
    if min(scores) >= bottom:
        return None
    return bottom, top + 0.08 * span


def build_figure(archive: Archive, density_target: float | None = None) -> Any:
    """The three-panel matplotlib figure of a run (the caller saves and closes it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise ModuleNotFoundError(PLOT_EXTRA_HINT) from exc

    rows = archive.all()
    scored = [r for r in rows if r.status in ("valid", "rejected") and r.combined_score is not None]
    valid = [r for r in scored if r.status == "valid"]
    fig, (ax_score, ax_trade, ax_line) = plt.subplots(1, 3, figsize=(16, 4.8))

    # Score against iteration, by author; rejected ones crossed; failures as ticks on the bottom edge
    # (they have no score, so no score level is theirs).
    limits = score_limits([r.combined_score for r in scored])
    floor = limits[0] if limits else None
    for author, (marker, colour, label) in STYLE.items():
        mine = [r for r in valid if r.author == author]
        if mine:
            ax_score.scatter([r.iteration for r in mine], [max(r.combined_score, floor) if floor is not None else r.combined_score
                                                          for r in mine], s=60 if author == "human" else 16,
                             marker=marker, color=colour, label=label, zorder=3)
    rejected = [r for r in scored if r.status == "rejected"]
    if rejected:
        ax_score.scatter([r.iteration for r in rejected], [max(r.combined_score, floor) if floor is not None
                                                           else r.combined_score for r in rejected],
                         s=30, marker="x", color="tab:red", label="rejected (held-out or review)", zorder=3)
    best_so_far, running = [], None
    for r in rows:
        if r.status == "valid" and r.combined_score is not None and (running is None or r.combined_score > running):
            running = r.combined_score
        if running is not None:
            best_so_far.append((r.iteration, running))
    if best_so_far:
        ax_score.step([i for i, _ in best_so_far], [b for _, b in best_so_far], where="post", color="black",
                      label="best so far")
    failed = [r.iteration for r in rows if r.status == "failed"]
    if failed:
        ax_score.plot(failed, [0.0] * len(failed), linestyle="none", marker="|", markersize=12, color="tab:gray",
                      transform=ax_score.get_xaxis_transform(), label=f"failed ({len(failed)}, no score)", clip_on=False)
    if limits:
        ax_score.set_ylim(*limits)
        below = sum(r.combined_score < limits[0] for r in scored)
        ax_score.annotate(f"{below} lower score(s) drawn on the bottom edge", (0.01, 0.02), xycoords="axes fraction",
                          fontsize=7, color="dimgray")
    ax_score.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_score.set(xlabel="iteration", ylabel="combined score (higher is better)", title="score")
    ax_score.legend(fontsize=8)

    # Error against density: the trade-off the search explores; error against iteration when every
    # candidate sits at the same density (usually the target), where a density axis shows nothing.
    densities = [r.density for r in valid if r.density is not None]
    flat = bool(densities) and (max(densities) - min(densities)) <= FLAT_DENSITY * (density_target or max(densities) or 1)
    if valid and flat:
        pts = ax_trade.scatter([r.iteration for r in valid], [r.error for r in valid],
                               c=[r.density for r in valid], cmap="viridis", s=16)
        ax_trade.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_trade.set(xlabel="iteration", ylabel="relative error",
                     title="error (every candidate at density " + (f"{min(densities):.3g})" if min(densities) == max(densities)
                                                                   else f"{min(densities):.3g}-{max(densities):.3g})"))
    else:
        if valid:
            pts = ax_trade.scatter([r.density for r in valid], [r.error for r in valid], c=[r.iteration for r in valid],
                                   cmap="viridis", s=16)
            fig.colorbar(pts, ax=ax_trade, label="iteration")
        if density_target is not None:
            ax_trade.axvline(density_target, color="tab:red", linestyle="--", linewidth=1, label="density target")
            ax_trade.legend(fontsize=8)
        ax_trade.set(xlabel="density", ylabel="relative error", title="error vs density")

    # Lineage of the best: each step from parent to child, labelled with its id and author.
    best = archive.best()
    if best is not None:
        chain = list(reversed(archive.lineage(best.id)))
        ax_line.step([c.iteration for c in chain], [c.combined_score for c in chain], where="post", color="tab:green")
        for c in chain:
            marker, colour, _ = STYLE.get(c.author, STYLE["model"])
            ax_line.scatter([c.iteration], [c.combined_score], marker=marker, color=colour, s=50, zorder=3)
            ax_line.annotate(c.id, (c.iteration, c.combined_score), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax_line.set_title(f"lineage of the best ({best.id}, {len(chain)} generation{'s' if len(chain) > 1 else ''})")
        first, last = chain[0].iteration, chain[-1].iteration
        if last - first < 2:  # a short chain would get fractional iteration ticks
            ax_line.set_xlim(first - 1, last + 1)
    ax_line.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_line.set(xlabel="iteration", ylabel="combined score")
    fig.suptitle(str(archive.run_dir))
    fig.tight_layout()
    return fig


def plot_run(archive: Archive, out: Path, density_target: float | None = None) -> Path:
    """Write the three-panel figure to ``out`` and return it."""
    fig = build_figure(archive, density_target)  # first: it explains a missing matplotlib
    import matplotlib.pyplot as plt

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
    finally:
        plt.close(fig)
    return out
