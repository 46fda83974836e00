"""Decode speedup of a candidate's selections: the trusted hook, packing, the CPU report, and
(on CUDA) the kernel against the scorer and the timing itself."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from evaluator.candidate import load_masker, masker_input
from evaluator.inprocess import score_file
from evaluator.records import AttentionRecord
from evaluator.sandbox import evaluate_in_sandbox
from evaluator.scoring import dense_weights, score_record
from evaluator.speedup import (
    PackedSelection, SelectionCollector, measure_speedup, pack_selection, score_with_speedup, synthetic_record,
    unavailable_reason,
)

SEEDS = Path(__file__).resolve().parents[1] / "seeds"
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def tiny4(tiny_workload):
    """'tiny' cut to 4 layers of both samples: enough records, a short sandbox run."""
    keep = (0, 7, 19, tiny_workload.num_layers - 1)
    return replace(tiny_workload, records=tuple(r for r in tiny_workload.records if r.layer in keep))


def seed_weights(seed: str, rec: AttentionRecord, target: float = 0.10) -> torch.Tensor:
    """A seed's validated weights on one record, through the scorer's own validation."""
    masker = load_masker(SEEDS / f"{seed}.py")
    return dense_weights(masker(masker_input(rec, target, 0)), rec)


def test_sandbox_hook_delivers_the_inprocess_selections(tiny4):
    """The sampling seed draws from the seeded generator: same weights, bit for bit, both ways."""
    boxed, local = SelectionCollector(), {}
    report = evaluate_in_sandbox(SEEDS / "vattention.py", tiny4, 0.10, on_selection=boxed)
    ref = score_file(SEEDS / "vattention.py", tiny4, 0.10,
                     on_selection=lambda i, rec, w: local.__setitem__(i, (rec, w.clone())))
    assert report.valid and ref.valid, (report.reason, ref.reason)
    assert report.combined_score == ref.combined_score
    assert sorted(boxed.packed) == sorted(local) == list(range(len(tiny4.records)))
    for i, (rec, w) in local.items():
        assert rec is tiny4.records[i]
        assert w.dtype == torch.float32 and tuple(w.shape) == rec.weights_shape
        assert bool((w > 1).any()), "vattention's sampled tokens should carry weights above 1"
        packed = boxed.packed[i]
        for qi, lst in enumerate(packed.lists):
            assert torch.equal(packed.dense(qi, lst.num_keys), w[:, :, qi, :lst.num_keys])
            assert not bool(w[:, :, qi, lst.num_keys:].ne(0).any())


def test_hook_failure_is_a_harness_error_not_a_candidate_failure(tiny4):
    """A bug in trusted hook code must surface, not be blamed on the candidate as a 'crash'."""
    def broken(i: int, rec: AttentionRecord, w: torch.Tensor) -> None:
        raise RuntimeError("hook bug")

    with pytest.raises(RuntimeError, match="hook bug"):
        evaluate_in_sandbox(SEEDS / "sink_window.py", tiny4, 0.10, on_selection=broken)


@pytest.mark.parametrize("seed", ["sink_window", "oracle_topk", "quest_pages", "hybrid_sampling"])
def test_pack_roundtrip_and_density(seed):
    rec = synthetic_record(context=300, n_queries=3)
    w = seed_weights(seed, rec)
    packed = pack_selection(rec, w)
    assert len(packed.lists) == 3
    for qi, lst in enumerate(packed.lists):
        assert lst.num_keys == int(rec.positions[qi]) + 1
        assert lst.indices.dtype == torch.int32 and lst.indices.shape == lst.weights.shape
        used = lst.indices >= 0
        assert bool((lst.weights[~used] == 0).all()) and bool((lst.weights[used] >= 1).all())
        assert torch.equal(packed.dense(qi, lst.num_keys), w[:, :, qi, :lst.num_keys])
    _, density = score_record(rec, w)
    assert math.isclose(packed.density, density, rel_tol=1e-9)


def test_shared_flag_follows_the_group_pattern():
    rec = synthetic_record(context=300, n_queries=2)
    assert all(lst.shared for lst in pack_selection(rec, seed_weights("sink_window", rec)).lists)
    w = seed_weights("sink_window", rec).clone()
    w[:, 1, 0, 5] = 1.0  # head 1 alone adds key 5: its group (heads 0-2) no longer shares a list
    lists = pack_selection(rec, w).lists
    assert not lists[0].shared and lists[1].shared


@pytest.mark.skipif(CUDA, reason="checks the report of a machine without CUDA")
def test_cpu_report_says_no_cuda_and_has_no_number(tiny4):
    rec = synthetic_record(context=200, n_queries=2)
    report = measure_speedup([rec], {0: seed_weights("oracle_topk", rec)})
    assert not report.measured and "no CUDA" in report.reason
    assert report.mean_speedup is None and report.overall_speedup is None and report.records == []
    score, speed = score_with_speedup(SEEDS / "sink_window.py", tiny4, 0.10, sandbox=False)
    assert score.valid and score.combined_score is not None
    assert not speed.measured and "no CUDA" in speed.reason and speed.mean_speedup is None
    assert json.loads(json.dumps(speed.to_dict()))["measured"] is False


gpu = pytest.mark.skipif(not CUDA or unavailable_reason() is not None, reason="needs CUDA and Triton")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("seed", ["sink_window", "oracle_topk", "quest_pages", "vattention", "group_hybrid"])
def test_kernel_matches_scorer_and_speedup_is_positive(seed):
    recs = [synthetic_record(context=2048, n_queries=3, seed=s, layer=s, device="cuda") for s in range(2)]
    sel = {i: seed_weights(seed, r) for i, r in enumerate(recs)}
    report = measure_speedup(recs, sel, reps=5)
    assert report.measured and report.error is None, report.error
    assert report.n_records == 2 and len(report.records) == 2
    for row in report.records:
        assert row.max_rel_err is not None and row.max_rel_err <= report.tolerance
        assert row.dense_us > 0 and row.sparse_us > 0 and row.speedup > 0
    assert report.mean_speedup > 0 and report.overall_speedup > 0
    assert 0 < report.density < 0.2
    # The group layout is timed for every GQA selection: the shared list, or the union of the group's lists.
    assert report.kv_records == 2 and report.overall_kv_speedup > 0
    assert all(row.shared == (seed in ("sink_window", "group_hybrid")) for row in report.records)
    assert report.kv_density >= report.density - 1e-12
    assert report.speedup == max(report.overall_speedup, report.overall_kv_speedup)
    json.dumps(report.to_dict())


@pytest.mark.gpu
@gpu
def test_packed_and_raw_selections_measure_alike_and_mismatch_is_an_error():
    rec = synthetic_record(context=1024, n_queries=2, device="cuda")
    w = seed_weights("hybrid_sampling", rec)
    packed = pack_selection(rec, w)
    assert isinstance(packed, PackedSelection)
    a = measure_speedup([rec], {0: packed}, reps=3)
    b = measure_speedup([rec], {0: w}, reps=3)
    assert a.measured and b.measured
    assert a.records[0].max_rel_err == b.records[0].max_rel_err  # same lists, same kernel, same inputs
    # A tolerance of zero cannot be met by an fp16 output: the report must carry an error, no speedup.
    bad = measure_speedup([rec], {0: packed}, reps=3, tolerance=0.0)
    assert not bad.measured and bad.error and "disagrees with the scorer" in bad.error
    assert bad.mean_speedup is None and bad.records[0].speedup is None


@pytest.mark.gpu
@gpu
def test_score_with_speedup_on_cuda_workload(tiny4):
    wl = replace(tiny4, records=tuple(r.to("cuda") for r in tiny4.records))
    score, speed = score_with_speedup(SEEDS / "oracle_topk.py", wl, 0.10, sandbox=True, reps=3, max_queries=2)
    assert score.valid, score.reason
    assert speed.measured, speed.error or speed.reason
    assert speed.n_records == len(wl.records) and speed.overall_speedup > 0
    assert math.isclose(speed.density, score.density, rel_tol=1e-9)


def _synthetic_workload(recs: list[AttentionRecord]):
    from types import SimpleNamespace

    return SimpleNamespace(records=tuple(recs), spec=SimpleNamespace(seed=0), label="synthetic")


def test_pack_counts_kv_rows_like_the_scorer():
    from evaluator.scoring import kv_density

    rec = synthetic_record(context=300, n_queries=3)
    for seed in ("oracle_topk", "group_hybrid", "sink_window"):
        w = seed_weights(seed, rec)
        packed = pack_selection(rec, w)
        assert packed.kv_density == pytest.approx(kv_density(rec, w), rel=1e-12)
        assert packed.kv_density >= packed.density - 1e-12


def test_speedup_options_pick_spreads_records():
    from evaluator.speedup import SpeedupOptions

    assert SpeedupOptions(records=4).pick(120) == [0, 40, 79, 119]
    assert SpeedupOptions(records=8).pick(3) == [0, 1, 2]
    assert SpeedupOptions(records=1).pick(10) == [0]


@pytest.mark.skipif(CUDA, reason="checks the report of a machine without CUDA")
def test_with_speedup_without_cuda_says_why_and_scores_as_usual():
    from evaluator.inprocess import score_masker
    from evaluator.speedup import SpeedupOptions, with_speedup

    recs = [synthetic_record(context=256, n_queries=2, seed=s, layer=s, num_layers=2) for s in range(2)]
    wl = _synthetic_workload(recs)
    hooks = []

    def score(hook):
        hooks.append(hook)
        return score_masker(load_masker(SEEDS / "group_hybrid.py"), wl, 0.10, on_selection=hook)

    report = with_speedup(score, wl, SpeedupOptions())
    assert hooks == [None]  # nothing is collected when nothing can be timed
    assert report.valid and report.speedup is None
    assert report.speedup_info == {"measured": False, "reason": unavailable_reason()}
    assert report.kv_density == pytest.approx(report.density)


@pytest.mark.gpu
@gpu
def test_with_speedup_times_the_validated_selections():
    from evaluator.inprocess import score_masker
    from evaluator.speedup import SpeedupOptions, with_speedup

    recs = [synthetic_record(context=4096, heads=32, kv_heads=8, head_dim=128, n_queries=2, seed=s, layer=s,
                             num_layers=3, device="cuda") for s in range(3)]
    wl = _synthetic_workload(recs)
    out = {}
    for seed in ("group_hybrid", "oracle_topk"):
        masker = load_masker(SEEDS / f"{seed}.py")
        out[seed] = with_speedup(lambda hook: score_masker(masker, wl, 0.10, on_selection=hook), wl,
                                 SpeedupOptions(records=2, queries=1, reps=5))
        rep = out[seed]
        assert rep.valid and rep.speedup is not None and rep.speedup > 0, rep.speedup_info
        info = rep.speedup_info
        assert info["measured"] and info["records_timed"] == [0, 2] and info["n_records"] == 2 and info["queries"] == 2
        assert info["speedup"] == rep.speedup and info["kv_density"] >= info["density"] - 1e-12
        json.dumps(info)
    assert out["group_hybrid"].speedup_info["layout"] in ("per-KV-head lists", "per-query-head lists")
    assert out["oracle_topk"].speedup_info["layout"] in ("group-union lists", "per-query-head lists")
    # An invalid candidate gets no timing at all.
    bad = with_speedup(lambda hook: score_masker(load_masker(Path(__file__).parent / "candidates" / "select_nothing.py"),
                                                 wl, 0.10, on_selection=hook), wl, SpeedupOptions())
    assert not bad.valid and bad.speedup is None and bad.speedup_info is None
