"""The LLM-free mutator: deterministic, type- and sign-preserving, scaffolding untouched."""
from __future__ import annotations

import random

from adrs.offline import OfflineMutator, crossover_block, find_constants, perturb_value
from evaluator.candidate import split_candidate
from tests.test_mutation import PARENT

HYBRID = PARENT.replace("SINK_TOKENS = 4\n", "SINK_TOKENS = 4\nWINDOW_FRACTION = 0.02\nTOPK_FRACTION = 0.05\n")


def test_same_seed_and_key_give_same_child():
    a = [OfflineMutator(seed=3).propose(HYBRID, key=i) for i in range(10)]
    b = [OfflineMutator(seed=3).propose(HYBRID, key=i) for i in range(10)]
    assert [r.code for r in a] == [r.code for r in b]
    assert all(r.ok for r in a)
    c = [OfflineMutator(seed=4).propose(HYBRID, key=i) for i in range(10)]
    assert [r.code for r in a] != [r.code for r in c]


def test_perturbation_keeps_scaffolding_and_changes_block():
    r = OfflineMutator(seed=0).propose(PARENT, key=1)
    assert r.ok and r.kind == "perturb" and r.summary.startswith("perturb:")
    old, new = split_candidate(PARENT), split_candidate(r.code)
    assert (old.prefix, old.suffix) == (new.prefix, new.suffix) and old.block != new.block


def test_perturb_value_keeps_type_and_sign():
    rng = random.Random(0)
    for _ in range(500):
        i = perturb_value(1, rng)
        assert isinstance(i, int) and i >= 1 and i != 1
        f = perturb_value(0.05, rng)
        assert isinstance(f, float) and 0.0 < f < 1.0
        g = perturb_value(3.5, rng)
        assert isinstance(g, float) and g > 0


def test_structural_integers_are_not_tunable():
    block = split_candidate(PARENT).block
    values = [c.value for c in find_constants(block)]
    assert values == [4]  # only SINK_TOKENS: axes, slices and -1 are left alone


def test_crossover_takes_partner_settings():
    partner = HYBRID.replace("WINDOW_FRACTION = 0.02", "WINDOW_FRACTION = 0.04").replace(
        "TOPK_FRACTION = 0.05", "TOPK_FRACTION = 0.01")
    new, changes = crossover_block(split_candidate(HYBRID).block, split_candidate(partner).block, random.Random(1))
    assert changes and ("WINDOW_FRACTION = 0.04" in new or "TOPK_FRACTION = 0.01" in new)
    kinds = {OfflineMutator(seed=0, crossover_rate=1.0).propose(HYBRID, partner, key=k).kind for k in range(5)}
    assert kinds == {"crossover"}


def test_no_constants_is_an_error():
    code = PARENT.replace("SINK_TOKENS = 4\n", "").replace("max=SINK_TOKENS", "max=keep")
    r = OfflineMutator().propose(code)
    assert not r.ok and "no tunable" in r.error


def test_offline_proposal_has_llm_shape():
    p = OfflineMutator(seed=0).proposal(PARENT, key=2)
    assert p.model == "offline" and p.usage.calls == 0 and p.code == OfflineMutator(seed=0).propose(PARENT, key=2).code
