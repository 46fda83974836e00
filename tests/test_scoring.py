"""The trusted scorer: float64 agreement, validation of every contract rule, aggregation."""
from __future__ import annotations

import math

import pytest
import torch

from evaluator.contract import SparseSelection
from evaluator.records import AttentionRecord
from evaluator.scoring import (
    InvalidSelection, aggregate, causal_weights, dense_attention, dense_weights, relative_error, score_record,
    sparse_attention,
)


def make_record(h=6, h_kv=2, q=5, k=40, d=16, seed=0) -> AttentionRecord:
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(1, h, q, d, generator=g) * 2
    keys = torch.randn(1, h_kv, k, d, generator=g) * 2
    values = torch.randn(1, h_kv, k, d, generator=g)
    positions = torch.arange(k - q, k) - 3  # last few keys are in the future for every query
    out = dense_attention(queries, keys, values, positions, d**-0.5)
    return AttentionRecord(0, 0, 1, queries, keys, values, positions, d**-0.5, out)


def reference_output(rec: AttentionRecord, w: torch.Tensor) -> torch.Tensor:
    """Direct float64 loop over queries: sum w e^s v / sum w e^s."""
    groups = rec.queries.shape[1] // rec.keys.shape[1]
    out = torch.zeros(rec.queries.shape, dtype=torch.float64)
    for h in range(rec.queries.shape[1]):
        for i in range(rec.queries.shape[2]):
            qv = rec.queries[0, h, i].double()
            kk = rec.keys[0, h // groups].double()
            vv = rec.values[0, h // groups].double()
            s = kk @ qv * rec.scaling
            ww = w[0, h, i].double()
            sel = ww > 0
            e = ww[sel] * torch.exp(s[sel] - s[sel].max())
            out[0, h, i] = (e[:, None] * vv[sel]).sum(0) / e.sum()
    return out


def random_weights(rec: AttentionRecord, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = rec.weights_shape
    keep = torch.rand(shape, generator=g) < 0.3
    w = torch.where(keep, 1.0 / torch.rand(shape, generator=g).clamp(min=0.05), torch.zeros(shape))
    w = w * causal_weights(shape, rec.positions, "cpu")
    w[..., 0] = 1.0  # never empty
    return w


@pytest.mark.parametrize("seed", range(5))
def test_sparse_output_matches_float64(seed):
    rec = make_record(seed=seed)
    w = random_weights(rec, seed)
    ours = sparse_attention(rec.queries, rec.keys, rec.values, w, rec.scaling)
    ref = reference_output(rec, w)
    assert torch.allclose(ours.double(), ref, rtol=1e-5, atol=1e-6)
    err, dens = score_record(rec, w)
    assert math.isclose(err, relative_error(rec.dense_out, ref.float()), rel_tol=1e-3, abs_tol=1e-6)
    causal = float((rec.positions + 1).sum()) * rec.queries.shape[1]
    assert dens == pytest.approx(float((w > 0).sum()) / causal)


def test_dense_selection_has_no_error_and_density_one():
    rec = make_record()
    w = causal_weights(rec.weights_shape, rec.positions, "cpu")
    err, dens = score_record(rec, w)
    assert err < 1e-6 and dens == 1.0


def test_huge_weights_stay_finite():
    rec = make_record()
    w = causal_weights(rec.weights_shape, rec.positions, "cpu") * 1e30
    err, _ = score_record(rec, w)
    assert err < 1e-5  # uniform scaling of all weights changes nothing


def test_sparse_form_equals_dense_form():
    rec = make_record()
    w = random_weights(rec, 3)
    n = int((w > 0).sum(-1).max())
    weights, indices = torch.topk(w, n, dim=-1)
    indices = torch.where(weights > 0, indices, torch.full_like(indices, -1))
    sparse = SparseSelection(indices=indices, weights=torch.where(weights > 0, weights, torch.ones_like(weights)))
    assert torch.equal(dense_weights(sparse, rec), w)
    assert score_record(rec, sparse) == score_record(rec, w)


def invalid_cases(rec):
    shape = rec.weights_shape
    ok = causal_weights(shape, rec.positions, "cpu")
    nan = ok.clone(); nan[0, 0, 0, 0] = float("nan")
    inf = ok.clone(); inf[0, 1, 0, 0] = float("inf")
    neg = ok.clone(); neg[0, 0, 1, 1] = -1.0
    frac = ok.clone(); frac[0, 0, 0, 1] = 0.5
    future = ok.clone(); future[0, 0, 0, -1] = 1.0
    empty = ok.clone(); empty[0, 2, 3] = 0.0
    class Sub(torch.Tensor):
        pass
    dup = SparseSelection(torch.zeros(*shape[:3], 2, dtype=torch.long), torch.ones(*shape[:3], 2))
    return {
        "NaN": nan, "infinite": inf, "negative": neg, "between 0 and 1": frac, "future": future, "empty": empty,
        "shape": ok[..., :-1], "dtype": ok.to(torch.int64), "plain torch.Tensor": ok.as_subclass(Sub),
        "twice": dup, "plain torch.Tensor, got builtins.list": [[0.0]],
    }


@pytest.mark.parametrize("reason", list(invalid_cases(make_record())))
def test_invalid_selections_are_rejected_with_reason(reason):
    rec = make_record()
    with pytest.raises(InvalidSelection, match=reason):
        score_record(rec, invalid_cases(rec)[reason])


def test_aggregate_penalty_and_breakdown():
    rows = [(0, 0, 0.2, 0.12), (0, 1, 0.4, 0.12), (1, 0, 0.1, 0.12), (1, 1, 0.3, 0.12)]
    rep = aggregate(rows, 0.10)
    assert rep.error == pytest.approx(0.25)
    assert rep.density_penalty == pytest.approx(2.0)
    assert rep.combined_score == pytest.approx(-2.25)
    assert [(l.layer, round(l.error, 6)) for l in rep.per_layer] == [(0, 0.15), (1, 0.35)]
    assert rep.worst == {"sample": 0, "layer": 1, "error": 0.4, "density": 0.12}


# ---------------------------------------------------------------- per-KV-head selections and kv_density
def test_per_kv_head_selection_is_broadcast_to_its_group():
    rec = make_record(h=6, h_kv=2)  # groups of 3 query heads
    g = torch.Generator().manual_seed(3)
    per_kv = random_weights(rec, 7)[:, ::3].clone()  # [1, 2, q, k]: one selection per KV head
    assert per_kv.shape == (1, 2, 5, 40)
    w = dense_weights(per_kv, rec)
    assert w.shape == rec.weights_shape
    for head in range(6):
        assert torch.equal(w[:, head], per_kv[:, head // 3])
    assert score_record(rec, per_kv) == score_record(rec, per_kv.repeat_interleave(3, dim=1))
    # The sparse form of that leading shape gives the same scores.
    n = 12
    idx = torch.stack([torch.randperm(30, generator=g)[:n] for _ in range(2 * 5)]).view(1, 2, 5, n)
    wts = 1.0 + torch.rand(1, 2, 5, n, generator=g) * 3
    sparse = SparseSelection(idx, wts)
    dense = torch.zeros(1, 2, 5, 40).scatter_(3, idx, wts)
    assert score_record(rec, sparse) == score_record(rec, dense)
    assert torch.equal(dense_weights(sparse, rec), dense.repeat_interleave(3, dim=1))


def test_kv_density_counts_each_groups_rows_once():
    from evaluator.scoring import kv_density, record_scores

    rec = make_record(h=4, h_kv=2, q=2, k=10, d=8)
    rec = AttentionRecord(0, 0, 1, rec.queries, rec.keys, rec.values, torch.tensor([4, 9]), rec.scaling,
                          dense_attention(rec.queries, rec.keys, rec.values, torch.tensor([4, 9]), rec.scaling))
    w = torch.zeros(1, 4, 2, 10)
    # group 0 (heads 0, 1): the same two keys for query 0; disjoint keys {0, 1} and {2, 3} for query 1
    w[0, 0, 0, [0, 4]] = 1.0
    w[0, 1, 0, [0, 4]] = 1.0
    w[0, 0, 1, [0, 1]] = 1.0
    w[0, 1, 1, [2, 3]] = 1.0
    # group 1 (heads 2, 3): head 2 picks one key, head 3 a superset of it
    w[0, 2, :, 1] = 1.0
    w[0, 3, :, [1, 2]] = 1.0
    causal = 5 + 10  # per (batch, head): query 0 sees 5 keys, query 1 sees 10
    assert kv_density(rec, w) == pytest.approx((2 + 4 + 2 + 2) / (causal * 2))
    err, dens, kvd = record_scores(rec, w)
    assert dens == pytest.approx((2 + 2 + 2 + 2 + 1 + 1 + 2 + 2) / (causal * 4))
    assert kvd == pytest.approx(kv_density(rec, w)) and kvd >= dens
    # A selection shared by every head of a group reads as many rows as it selects.
    shared = w[:, ::2].repeat_interleave(2, dim=1)
    assert kv_density(rec, shared) == pytest.approx(score_record(rec, shared)[1])
    # Without GQA each head is its own group: kv_density is density.
    solo = make_record(h=3, h_kv=3)
    ws = random_weights(solo, 1)
    assert kv_density(solo, ws) == pytest.approx(score_record(solo, ws)[1])


def test_aggregate_averages_kv_density_like_density():
    rows = [(0, 0, 0.2, 0.10, 0.20), (0, 1, 0.4, 0.10, 0.30), (1, 0, 0.1, 0.10, 0.10), (1, 1, 0.3, 0.10, 0.20)]
    rep = aggregate(rows, 0.10)
    assert rep.kv_density == pytest.approx(0.2)
    assert [(l.layer, round(l.kv_density, 6)) for l in rep.per_layer] == [(0, 0.15), (1, 0.25)]
    assert rep.to_dict()["kv_density"] == pytest.approx(0.2)
    old = aggregate([r[:4] for r in rows], 0.10)  # rows without it (older callers): no number, same score
    assert old.kv_density is None and old.combined_score == rep.combined_score


@pytest.mark.parametrize("h_kv", [2, 6])
def test_wrong_shapes_name_the_accepted_ones(h_kv):
    rec = make_record(h=6, h_kv=h_kv)
    with pytest.raises(InvalidSelection) as info:
        dense_weights(torch.ones(1, 4, 5, 40), rec)
    msg = str(info.value)
    assert "(1, 4, 5, 40)" in msg and "[b, h, q, k] = (1, 6, 5, 40)" in msg
    if h_kv == 2:
        assert "[b, h_kv, q, k] = (1, 2, 5, 40) (per KV head" in msg
    else:  # no GQA: one shape, nothing about KV heads
        assert "h_kv" not in msg
    with pytest.raises(InvalidSelection) as info:
        dense_weights(SparseSelection(torch.zeros(1, 4, 5, 3, dtype=torch.long), torch.ones(1, 4, 5, 3)), rec)
    assert "[b, h, q, n] with [b, h, q] = (1, 6, 5)" in str(info.value)
    assert ("[b, h_kv, q, n] with [b, h_kv, q] = (1, 2, 5)" in str(info.value)) == (h_kv == 2)
