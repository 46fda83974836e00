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
