"""Workload capture with the real embedded model: shapes, caching, consistency, texts."""
from __future__ import annotations

import pytest
import torch

from evaluator.scoring import dense_attention
from evaluator.workload import capture, load_workload
from evaluator.workload.spec import PRESETS, WorkloadSpec, resolve_spec
from evaluator.workload.texts import load_text, needle_tasks, sample_windows


def test_tiny_workload_shapes(tiny_workload):
    spec = tiny_workload.spec
    assert tiny_workload.num_layers == 30
    assert len(tiny_workload.records) == spec.n_samples * 30
    rec = tiny_workload.records[0]
    assert rec.queries.shape == (1, 9, spec.n_queries, 64)
    assert rec.keys.shape == rec.values.shape == (1, 3, spec.context_len, 64)
    assert rec.positions.tolist() == list(range(spec.context_len - spec.n_queries, spec.context_len))
    assert rec.scaling == pytest.approx(64**-0.5)


def test_dense_outputs_match_recomputation(tiny_workload):
    for rec in tiny_workload.records[::7]:
        out = dense_attention(rec.queries, rec.keys, rec.values, rec.positions, rec.scaling)
        assert torch.allclose(out, rec.dense_out, atol=1e-5)


def test_captured_output_matches_the_model(tiny_workload):
    """Running stock SDPA on the captured post-RoPE tensors reproduces the model's attention output."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seen = {}

    def spy(module, query, key, value, attention_mask, **kwargs):
        out = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        seen[module.layer_idx] = out[0][:, -tiny_workload.spec.n_queries:].transpose(1, 2)
        return out

    from evaluator.workload.model import load_model
    from evaluator.workload.texts import load_text

    model, tok = load_model("embedded")
    model.set_attn_implementation(capture.register_attention(spy))
    spec = tiny_workload.spec
    ids = tok(load_text(spec.texts, spec.text_split), return_tensors="pt")["input_ids"][0]
    start = sample_windows(len(ids), spec.n_samples, spec.context_len, spec.seed)[0]
    with torch.inference_mode():
        model(input_ids=ids[start : start + spec.context_len][None], use_cache=False, logits_to_keep=1)
    for layer in (0, 15, 29):
        rec = tiny_workload.records[layer]
        rel = (seen[layer] - rec.dense_out).norm() / rec.dense_out.norm()
        assert rel < 5e-3, f"layer {layer}: {rel}"  # float16 storage of q/k/v


def test_second_load_does_not_run_the_model(tiny_workload, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("model was loaded again")

    monkeypatch.setattr(capture, "load_model", boom)
    again = load_workload("tiny", progress=False)
    assert again.hash == tiny_workload.hash
    assert torch.equal(again.records[5].keys, tiny_workload.records[5].keys)


def test_spec_hash_and_presets():
    assert resolve_spec("tiny") is PRESETS["tiny"]
    assert PRESETS["tiny"].content_hash() != PRESETS["tiny-heldout"].content_hash()
    renamed = PRESETS["tiny"].model_copy(update={"name": "other"})
    assert renamed.content_hash() == PRESETS["tiny"].content_hash()
    with pytest.raises(ValueError, match="unknown workload"):
        resolve_spec("nope")
    with pytest.raises(Exception, match="extra"):
        WorkloadSpec(name="x", bogus=1)


def test_texts_split_and_windows():
    even, odd = load_text("pydoc", "even"), load_text("pydoc", "odd")
    assert len(even) > 100_000 and len(odd) > 100_000 and even[:500] != odd[:500]
    starts = sample_windows(10_000, 4, 1000, seed=3)
    assert starts == sample_windows(10_000, 4, 1000, seed=3)
    assert all(b - a >= 1000 for a, b in zip(starts, starts[1:])) or len(set(starts)) == 4
    with pytest.raises(ValueError, match="fewer than"):
        sample_windows(100, 1, 1000, 0)


def test_needle_tasks_hide_the_answer():
    text = load_text("pydoc", "even")
    tasks = needle_tasks(text, 5, 4000, seed=1)
    assert tasks == needle_tasks(text, 5, 4000, seed=1)
    for t in tasks:
        assert t.answer in t.prompt and t.prompt.rstrip().endswith(f"pass key for {t.key} is")
        assert 0.0 <= t.depth <= 1.0


def test_workload_identity_covers_the_texts_not_just_their_name(tmp_path):
    """pydoc's topics differ between Python versions: the hash must change with the text itself."""
    from evaluator.faithful.spec import FaithfulSpec
    from evaluator.workload.spec import WorkloadSpec

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("first paragraph\n\nsecond paragraph")
    spec, faithful = WorkloadSpec(texts=str(corpus)), FaithfulSpec(texts=str(corpus))
    before = (spec.content_hash(), faithful.content_hash())
    corpus.write_text("first paragraph\n\nsecond paragraph, edited")
    after = (spec.content_hash(), faithful.content_hash())
    assert before[0] != after[0] and before[1] != after[1]
    assert WorkloadSpec().content_hash() == WorkloadSpec(name="renamed").content_hash()  # the name is not content
