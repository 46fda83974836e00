"""`adrs plot`: one PNG with the run's progress, its error/density trade-off and the best's lineage."""
from __future__ import annotations

from pathlib import Path

from adrs.archive.store import Archive

PLOT_EXTRA_HINT = "plots need matplotlib: pip install 'adrs[plot]'"


def plot_run(archive: Archive, out: Path, density_target: float | None = None) -> Path:
    """Write the three-panel figure to ``out`` and return it."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ModuleNotFoundError(PLOT_EXTRA_HINT) from exc

    rows = archive.all()
    valid = [r for r in rows if r.status == "valid"]
    fig, (ax_score, ax_trade, ax_line) = plt.subplots(1, 3, figsize=(16, 4.8))

    # Score against iteration: every scored candidate, failures marked at the bottom.
    ax_score.scatter([r.iteration for r in valid], [r.combined_score for r in valid], s=14, label="valid", color="tab:blue")
    rejected = [r for r in rows if r.status == "rejected" and r.combined_score is not None]
    if rejected:
        ax_score.scatter([r.iteration for r in rejected], [r.combined_score for r in rejected], s=22,
                         marker="x", color="tab:red", label="rejected (held-out or review)")
    best_so_far, running = [], None
    for r in rows:
        if r.status == "valid" and (running is None or r.combined_score > running):
            running = r.combined_score
        best_so_far.append((r.iteration, running))
    xs = [i for i, b in best_so_far if b is not None]
    ax_score.step(xs, [b for _, b in best_so_far if b is not None], where="post", color="black", label="best so far")
    failed = [r.iteration for r in rows if r.status == "failed"]
    if failed and valid:
        floor = min(r.combined_score for r in valid)
        ax_score.scatter(failed, [floor] * len(failed), marker="v", color="tab:gray", s=14, label="failed")
    ax_score.set(xlabel="iteration", ylabel="combined score (higher is better)", title="score")
    ax_score.legend(fontsize=8)

    # Density against error: the trade-off the search explores.
    if valid:
        pts = ax_trade.scatter([r.density for r in valid], [r.error for r in valid], c=[r.iteration for r in valid],
                               cmap="viridis", s=16)
        fig.colorbar(pts, ax=ax_trade, label="iteration")
    if density_target is not None:
        ax_trade.axvline(density_target, color="tab:red", linestyle="--", linewidth=1, label="density target")
        ax_trade.legend(fontsize=8)
    ax_trade.set(xlabel="density", ylabel="relative error", title="error vs density")

    # Lineage of the best: the chain of parents that led to it.
    best = archive.best()
    if best is not None:
        chain = list(reversed(archive.lineage(best.id)))
        ax_line.plot([c.iteration for c in chain], [c.combined_score if c.combined_score is not None else float("nan")
                                                    for c in chain], marker="o", color="tab:green")
        for c in chain:
            ax_line.annotate(c.id, (c.iteration, c.combined_score or 0), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax_line.set_title(f"lineage of the best ({best.id})")
    ax_line.set(xlabel="iteration", ylabel="combined score")
    fig.suptitle(str(archive.run_dir))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
