"""Prompt rendering from the template files, with plain-data inputs."""
from __future__ import annotations

import pytest

from adrs.prompts import render_prompt
from evaluator.scoring import LayerScore, ScoreReport
from tests.test_mutation import PARENT


def report() -> ScoreReport:
    return ScoreReport(
        valid=True, combined_score=-0.25, error=0.25, density=0.1, density_penalty=0.0, density_target=0.1,
        per_layer=[LayerScore(0, 0.2, 0.1), LayerScore(1, 0.3, 0.1)],
        worst={"sample": 0, "layer": 1, "error": 0.3, "density": 0.1}, n_records=2,
    )


def test_render_has_every_section():
    p = render_prompt(
        PARENT, report().to_dict(), parent_id="c007", density_target=0.05,
        failures=["syntax error at line 3", {"summary": "bigger window", "category": "invalid", "reason": "non-causal"}],
        top=[{"id": "c003", "code": "SINK_TOKENS = 9", "combined_score": -0.2, "error": 0.2, "density": 0.1}],
        diverse=[{"id": "c004", "code": "SINK_TOKENS = 1", "combined_score": -0.4, "error": 0.4, "density": 0.05}],
        notes=["sampling weights must be 1/p"],
    )
    assert "Density target: 0.05" in p.system and "density_penalty" in p.system and "<<<<<<< SEARCH" in p.system
    assert "masker(inp: MaskerInput)" in p.system
    u = p.user
    assert "c007" in u and "def masker(inp: MaskerInput)" in u
    assert "| 1 | 0.3 | 0.1 |" in u and "worst record: sample 0, layer 1" in u
    assert "syntax error at line 3" in u and "bigger window: invalid: non-causal" in u
    assert "c003" in u and "SINK_TOKENS = 9" in u and "c004" in u
    assert "sampling weights must be 1/p" in u
    assert [m["role"] for m in p.messages()] == ["system", "user"]


def test_dataclass_report_and_empty_sections():
    p = render_prompt(PARENT, report())
    assert "combined_score = -0.25" in p.user and p.user.count("(none)") == 4


def test_invalid_parent_score():
    p = render_prompt(PARENT, ScoreReport.failure("invalid", "selection attends to future tokens").to_dict())
    assert "INVALID (invalid): selection attends to future tokens" in p.user


def test_code_with_dollars_and_braces_is_safe():
    code = PARENT.replace("SINK_TOKENS = 4", 'SINK_TOKENS = 4  # ${not a placeholder} {x}')
    assert "${not a placeholder} {x}" in render_prompt(code).user


def test_custom_template_dir_and_unknown_placeholder(tmp_path):
    (tmp_path / "system.md").write_text("target $density_target costs $$1")
    (tmp_path / "user.md").write_text("code:\n$parent_code\n$notes")
    p = render_prompt("x = 1", template_dir=tmp_path, notes=["n1"])
    assert p.system == "target 0.1 costs $1" and p.user == "code:\nx = 1\n- n1"
    (tmp_path / "user.md").write_text("$parent_cod")
    with pytest.raises(KeyError, match="parent_cod"):
        render_prompt("x = 1", template_dir=tmp_path)


def test_archive_shaped_records():
    failed = ScoreReport.failure("exception", "RuntimeError: shape mismatch", details="Traceback ...").to_dict()
    failed["mutation"] = {"kind": "diff", "summary": "add top-k"}
    top = {"id": "c9", "code": PARENT.replace("SINK_TOKENS = 4", "SINK_TOKENS = 7"), "combined_score": -0.1}
    u = render_prompt(PARENT, failures=[failed], top=[top]).user
    assert "add top-k: exception: RuntimeError: shape mismatch" in u and "Traceback" in u
    insp = u.split("## Top candidates")[1]
    assert "SINK_TOKENS = 7" in insp and "import torch" not in insp  # only the EVOLVE block is shown


def test_prompt_explains_kv_density_and_the_objective():
    from adrs.prompts import render_prompt

    rep = {"valid": True, "combined_score": -0.2, "error": 0.2, "density": 0.1, "density_target": 0.1,
           "density_penalty": 0.0, "kv_density": 0.25, "speedup": 2.5, "speedup_penalty": 15.0}
    p = render_prompt("x = 1", rep, top=[dict(rep, id="c000003", code="x = 2")])
    assert "kv_density" in p.system and "[b, h_kv, q, k]" in p.system and "This run ranks by density" in p.system
    assert "kv_density = 0.25" in p.user and "decode speedup = 2.5" in p.user and "kv_density 0.25" in p.user
    fast = render_prompt("x = 1", rep, objective="speedup", speedup_target=4.0)
    assert "RANKS BY DECODE SPEED" in fast.system and "1/4)" in fast.system
