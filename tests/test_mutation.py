"""Applying model replies: SEARCH/REPLACE edits, full rewrites, and the errors sent back."""
from __future__ import annotations

from adrs.mutation import apply_reply, check_candidate, parse_edit_blocks
from evaluator.candidate import split_candidate

PARENT = '''"""Seed: sinks + window."""
import torch

from evaluator.contract import MaskerInput, Selection, budget, causal_mask

# EVOLVE-BLOCK-START
SINK_TOKENS = 4


def masker(inp: MaskerInput) -> Selection:
    keep = budget(inp)
    sink = torch.clamp(keep, max=SINK_TOKENS)
    window = keep - sink
    k = torch.arange(inp.num_keys, device=inp.keys.device)[None, :]
    pos = inp.query_positions.to(inp.keys.device)[:, None]
    selected = (k < sink[:, None]) | (k > pos - window[:, None])
    selected = selected & causal_mask(inp)
    b, h = inp.queries.shape[:2]
    return selected.float().expand(b, h, -1, -1)
# EVOLVE-BLOCK-END
'''


def diff(search: str, replace: str, summary: str = "Summary: tweak") -> str:
    return f"{summary}\n\n<<<<<<< SEARCH\n{search}\n=======\n{replace}\n>>>>>>> REPLACE\n"


def scaffolding(code: str) -> tuple[str, str]:
    parts = split_candidate(code)
    return parts.prefix, parts.suffix


def test_good_diff_applies_inside_block():
    r = apply_reply(PARENT, diff("SINK_TOKENS = 4", "SINK_TOKENS = 8", "Summary: more sinks"))
    assert r.ok and r.kind == "diff" and r.n_edits == 1
    assert "SINK_TOKENS = 8" in r.code and r.summary == "more sinks"
    assert scaffolding(r.code) == scaffolding(PARENT)


def test_indentation_tolerant_match_uses_block_indentation():
    # The model dropped the 4-space indentation of the function body.
    reply = diff("window = keep - sink\nk = torch.arange(inp.num_keys, device=inp.keys.device)[None, :]",
                 "window = (keep - sink).clamp(min=0)\nk = torch.arange(inp.num_keys, device=inp.keys.device)[None, :]")
    r = apply_reply(PARENT, reply)
    assert r.ok, r.error
    assert "    window = (keep - sink).clamp(min=0)\n" in r.code


def test_trailing_whitespace_tolerant_match():
    r = apply_reply(PARENT, diff("    keep = budget(inp)   \n    sink = torch.clamp(keep, max=SINK_TOKENS)  ",
                                 "    keep = budget(inp)\n    sink = torch.clamp(keep, max=2 * SINK_TOKENS)"))
    assert r.ok, r.error
    assert "max=2 * SINK_TOKENS" in r.code


def test_non_matching_diff_reports_closest_text():
    r = apply_reply(PARENT, diff("    keep = budget(inp, 0.2)", "    keep = budget(inp, 0.1)"))
    assert not r.ok and r.repairable and r.kind == "diff"
    assert "not found in the EVOLVE block" in r.error and "keep = budget(inp)" in r.error


def test_ambiguous_diff_is_an_error():
    r = apply_reply(PARENT, diff("inp.keys.device", "inp.queries.device"))
    assert not r.ok and "matches 2 places" in r.error


def test_edit_of_scaffolding_is_refused():
    r = apply_reply(PARENT, diff("import torch", "import torch\nimport os"))
    assert not r.ok and "scaffolding" in r.error


def test_full_rewrite_block_only():
    block = "SINK_TOKENS = 2\n\n\ndef masker(inp):\n    return None\n"
    r = apply_reply(PARENT, f"Summary: rewrite\n```python\n{block}```\n")
    assert r.ok and r.kind == "rewrite"
    assert split_candidate(r.code).block == block
    assert scaffolding(r.code) == scaffolding(PARENT)


def test_full_file_with_changed_scaffolding_keeps_parent_scaffolding():
    theirs = PARENT.replace("import torch\n", "import torch\nimport os\n").replace("SINK_TOKENS = 4", "SINK_TOKENS = 16")
    r = apply_reply(PARENT, f"Here is the file:\n```python\n{theirs}```")
    assert r.ok and r.kind == "rewrite"
    assert "import os" not in r.code and "SINK_TOKENS = 16" in r.code
    assert scaffolding(r.code) == scaffolding(PARENT)
    assert r.notes and "ignored" in r.notes[0]


def test_prose_only_is_no_code():
    r = apply_reply(PARENT, "I think a larger window would help because recent tokens matter.")
    assert not r.ok and r.kind == "none" and r.error.startswith("no code")


def test_syntax_error_is_caught_before_evaluation():
    r = apply_reply(PARENT, diff("SINK_TOKENS = 4", "SINK_TOKENS = (4"))
    assert not r.ok and "syntax error" in r.error and r.repairable


def test_rewrite_must_keep_entry_point():
    r = apply_reply(PARENT, "```python\nSINK_TOKENS = 3\n```")
    assert not r.ok and "masker" in r.error


def test_no_op_change_is_an_error():
    r = apply_reply(PARENT, diff("SINK_TOKENS = 4", "SINK_TOKENS = 4"))
    assert not r.ok and "unchanged" in r.error


def test_multiple_edits_all_or_nothing():
    reply = diff("SINK_TOKENS = 4", "SINK_TOKENS = 5") + diff("nope = 1", "nope = 2")
    r = apply_reply(PARENT, reply)
    assert not r.ok and "edit 2 of 2" in r.error
    blocks, err = parse_edit_blocks(reply)
    assert err is None and len(blocks) == 2


def test_unterminated_block_is_reported():
    r = apply_reply(PARENT, "<<<<<<< SEARCH\nSINK_TOKENS = 4\n=======\nSINK_TOKENS = 5\n")
    assert not r.ok and "REPLACE" in r.error


def test_check_candidate_accepts_parent():
    assert check_candidate(PARENT) is None


def test_marker_lines_quoted_in_search_are_ignored():
    r = apply_reply(PARENT, diff("# EVOLVE-BLOCK-START\nSINK_TOKENS = 4", "# EVOLVE-BLOCK-START\nSINK_TOKENS = 6"))
    assert r.ok, r.error
    assert r.code.count("# EVOLVE-BLOCK-START") == 1 and "SINK_TOKENS = 6" in r.code


def test_diff_blocks_inside_a_fence_are_found():
    r = apply_reply(PARENT, "Summary: x\n```python\n" + diff("SINK_TOKENS = 4", "SINK_TOKENS = 5", "") + "```\n")
    assert r.ok and r.kind == "diff" and r.summary == "x"


def test_reasoning_sections_are_ignored():
    reply = "<think>maybe\n```python\nSINK_TOKENS = 99\n```\n</think>\n" + diff("SINK_TOKENS = 4", "SINK_TOKENS = 5")
    r = apply_reply(PARENT, reply)
    assert r.ok and "SINK_TOKENS = 5" in r.code and "99" not in r.code
