"""`adrs export`: a candidate as one file that runs without adrs installed (torch is enough).

The candidate's ``from evaluator.contract import ...`` is replaced by the contract module's
own source, inlined, so every helper it uses (``budget``, ``causal_mask``, ``MaskerInput``...)
is defined in the file. Its scores go into a header comment.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import evaluator.contract as contract

FUTURE = "from __future__ import annotations"
SCORE_KEYS = ("combined_score", "error", "density", "kv_density", "density_penalty", "speedup", "workload")

DEMO = '''

if __name__ == "__main__":
    # A smoke test on random inputs: shapes as in SmolLM2 (9 query heads, 3 KV heads, 64 dims).
    _gen = torch.Generator().manual_seed(0)
    _k = 512
    _inp = MaskerInput(
        queries=torch.randn(1, 9, 4, 64, generator=_gen), keys=torch.randn(1, 3, _k, 64, generator=_gen),
        scaling=64 ** -0.5, query_positions=torch.arange(_k - 4, _k), layer_idx=0, num_layers=1,
        density_target=0.10, generator=_gen,
    )
    _sel = masker(_inp)
    _w = _sel.weights if hasattr(_sel, "weights") and not isinstance(_sel, torch.Tensor) else _sel
    print(f"masker ran on random input: output {type(_sel).__name__} {tuple(_w.shape)}")
'''


def _contract_body() -> str:
    """The contract module's source without its docstring and future import (the file has its own)."""
    source = Path(contract.__file__).read_text()
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    start = tree.body[1].lineno - 1 if isinstance(tree.body[0], ast.Expr) else 0
    body = "".join(lines[start:])
    return body.replace(FUTURE + "\n", "", 1)


def _without_contract_imports(code: str) -> str:
    """``code`` with its imports of the contract replaced: the names are defined in this file."""
    tree = ast.parse(code)
    lines = code.splitlines(keepends=True)
    edits: list[tuple[int, int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("evaluator.contract", "evaluator") and node.level == 0:
            if node.module == "evaluator":  # from evaluator import contract [as c]
                names = [a.asname or a.name for a in node.names if a.name == "contract"]
                text = "".join(f"{n} = sys.modules[__name__]  # the contract is inlined above\n" for n in names)
                edits.append((node.lineno, node.end_lineno, "import sys\n" + text if names else ""))
            else:
                edits.append((node.lineno, node.end_lineno, "# (the contract is inlined above)\n"))
        elif isinstance(node, ast.Import):
            kept = [a for a in node.names if not a.name.startswith("evaluator")]
            if len(kept) != len(node.names):
                aliases = [a for a in node.names if a.name == "evaluator.contract" and a.asname]
                text = "import sys\n" + "".join(f"{a.asname} = sys.modules[__name__]  # the contract is inlined above\n"
                                                for a in aliases)
                if kept:
                    text += "import " + ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in kept) + "\n"
                edits.append((node.lineno, node.end_lineno, text))
    indent_ok = [e for e in edits if not lines[e[0] - 1][:1].isspace()]  # top-level imports only
    for first, last, text in sorted(indent_ok, reverse=True):
        lines[first - 1:last] = [text]
    return "".join(lines).replace(FUTURE + "\n", "", 1)


def _comment(text: Any) -> str:
    return " ".join(str(text).split())  # one line: a comment cannot end early


def standalone_masker(code: str, record: dict[str, Any], ref: Any, run_dir: Path) -> str:
    """The candidate ``code`` as a standalone file, its scores from ``record`` in the header."""
    header = [
        f"# {ref.id} of the adrs run {_comment(run_dir)}: iteration {ref.iteration}, island {ref.island}, "
        f"author {ref.author}, status {ref.status}",
        f"# commit {ref.commit}; parent {ref.parent_id or '-'}",
        f"# summary: {_comment(ref.summary)}",
        "# scores (trusted scorer, at export): " + ", ".join(
            f"{k} {record[k]:.6g}" if isinstance(record.get(k), float) else f"{k} {_comment(record.get(k))}"
            for k in SCORE_KEYS if record.get(k) is not None),
    ]
    if ref.reject_reason:
        header.append(f"# rejected: {_comment(ref.reject_reason)}")
    header += [
        "#",
        "# Standalone: the candidate contract (evaluator/contract.py) is inlined below, so this file",
        "# needs only torch. Call masker(MaskerInput(...)); `python THIS_FILE` runs it on random input.",
    ]
    parts = [FUTURE, "\n".join(header), "# ---- the candidate contract (evaluator/contract.py), inlined ----",
             _contract_body().strip(), "# ---- the candidate ----", _without_contract_imports(code).strip()]
    return "\n\n".join(parts) + "\n" + DEMO
