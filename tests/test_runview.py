"""The web view's read-only run handle keeps up with a run another process writes."""
from __future__ import annotations

from adrs.archive import open_run
from adrs.web.runview import open_view

SEED_CODE = "def masker(inp):\n    return topk(inp, 0.1)\n"


def _record(score: float) -> dict:
    return {"valid": True, "combined_score": score, "error": -score, "density": 0.1}


def test_a_view_opened_on_an_empty_run_shows_candidates_that_all_land_between_two_looks(tmp_path):
    """An empty run has no refs at all: its first listing is empty, and must not be mistaken for
    'not looked yet' (the web view then never showed a run whose candidates all landed between two polls)."""
    run_dir = tmp_path / "run"
    open_run(run_dir, create=True).close()
    view = open_view("run", run_dir)
    try:
        before = view.refresh(force=True)
        assert view.rows() == []
        with open_run(run_dir) as archive:
            seed = archive.add_candidate(SEED_CODE, _record(-0.2), author="seed", summary="seed")
            archive.add_candidate(SEED_CODE.replace("0.1", "0.09"), _record(-0.1), parent=seed.id)
        after = view.refresh(force=True)
        assert after > before
        assert [r.id for r in view.rows()] == ["c000000", "c000001"]
    finally:
        view.close()
