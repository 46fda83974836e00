"""Render the system and user prompts from the template files in ``prompts/``.

Templates use ``string.Template`` placeholders (``$name``), so the Python code and braces
inside them need no escaping; write ``$$`` for a literal dollar sign. Everything passed in
is plain data (dicts or dataclasses), never the archive, so prompts can be rendered and
tested without a run.
"""
from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from evaluator.candidate import CandidateFormatError, split_candidate
from evaluator.contract import ENTRY_POINT

DEFAULT_TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "prompts"
SYSTEM_TEMPLATE = "system.md"
USER_TEMPLATE = "user.md"
NONE_TEXT = "(none)"


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt pair."""

    system: str
    user: str

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}, {"role": "user", "content": self.user}]


def _as_dict(item: Any) -> dict[str, Any]:
    if item is None:
        return {}
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return dataclasses.asdict(item)
    if isinstance(item, Mapping):
        return dict(item)
    if hasattr(item, "to_dict"):
        return dict(item.to_dict())
    raise TypeError(f"expected a mapping or dataclass, got {type(item).__name__}")


def _num(x: Any, fmt: str = ".4g") -> str:
    return "n/a" if x is None else format(x, fmt)


def format_score(score: Any) -> str:
    """A score record (ScoreReport.to_dict() shape) as text with a per-layer table."""
    s = _as_dict(score)
    if not s:
        return "not scored yet"
    if not s.get("valid", True):
        return f"INVALID ({s.get('category') or 'failure'}): {s.get('reason') or 'no reason given'}"
    lines = [
        f"combined_score = {_num(s.get('combined_score'))}, error = {_num(s.get('error'))}, "
        f"density = {_num(s.get('density'))} (target {_num(s.get('density_target'))}, "
        f"penalty {_num(s.get('density_penalty'))})"
        + (f", kv_density = {_num(s.get('kv_density'))}" if s.get("kv_density") is not None else "")
        + (f", decode speedup = {_num(s.get('speedup'))}x" if s.get("speedup") is not None else "")
        + (f" (speedup penalty {_num(s.get('speedup_penalty'))})" if s.get("speedup_penalty") is not None else ""),
    ]
    worst = s.get("worst")
    if worst:
        lines.append(f"worst record: sample {worst.get('sample')}, layer {worst.get('layer')}, "
                     f"error {_num(worst.get('error'))}, density {_num(worst.get('density'))}")
    layers = [_as_dict(x) for x in s.get("per_layer") or []]
    if layers:
        lines += ["", "| layer | error | density |", "|---:|---:|---:|"]
        lines += [f"| {x.get('layer')} | {_num(x.get('error'))} | {_num(x.get('density'))} |" for x in layers]
    return "\n".join(lines)


def format_failures(failures: Sequence[Any], max_chars: int = 1500) -> str:
    """Failure texts of recent failed children (strings or score dicts), each truncated."""
    out = []
    for f in failures:
        if isinstance(f, str):
            text = f
        else:
            d = _as_dict(f)
            mutation = d.get("mutation") if isinstance(d.get("mutation"), Mapping) else {}
            head = d.get("summary") or mutation.get("summary") or d.get("id") or "child"
            reason = d.get("reason") or d.get("error") or mutation.get("error") or ""
            text = f"{head}: {d.get('category') or 'failure'}: {reason}"
            if d.get("details"):
                text += f"\n{d['details']}"
        text = text.strip()
        if len(text) > max_chars:
            text = text[:max_chars] + "\n... (truncated)"
        out.append(f"- {text}")
    return "\n".join(out) if out else NONE_TEXT


def _evolve_block(code: str) -> str:
    """Only the EVOLVE block of a full candidate: the scaffolding is the same for all, save tokens."""
    try:
        return split_candidate(code).block
    except CandidateFormatError:
        return code


def format_inspirations(items: Sequence[Any]) -> str:
    """Inspiration candidates: id, scores, summary and their EVOLVE-block code."""
    out = []
    for item in items:
        d = _as_dict(item)
        head = (f"### {d.get('id', '?')}: combined_score {_num(d.get('combined_score'))}, "
                f"error {_num(d.get('error'))}, density {_num(d.get('density'))}"
                + (f", kv_density {_num(d.get('kv_density'))}" if d.get("kv_density") is not None else "")
                + (f", speedup {_num(d.get('speedup'))}x" if d.get("speedup") is not None else ""))
        if d.get("summary"):
            head += f"\n{d['summary']}"
        out.append(f"{head}\n```python\n{_evolve_block(str(d.get('code', ''))).strip()}\n```")
    return "\n\n".join(out) if out else NONE_TEXT


def load_template(name: str, template_dir: Path | str | None = None) -> string.Template:
    path = Path(template_dir or DEFAULT_TEMPLATE_DIR) / name
    return string.Template(path.read_text())


def _substitute(template: string.Template, name: str, values: Mapping[str, str]) -> str:
    try:
        return template.substitute(values)
    except KeyError as exc:  # a typo in an edited template should fail loudly, naming the file
        raise KeyError(f"template {name} uses unknown placeholder ${exc.args[0]}; known: {sorted(values)}") from None
    except ValueError as exc:
        raise ValueError(f"template {name}: {exc} (write $$ for a literal $)") from None


def objective_text(objective: str, speedup_target: float | None) -> str:
    """What the run ranks by, for the system prompt (``$objective``)."""
    if objective == "speedup":
        return (f"- THIS RUN RANKS BY DECODE SPEED instead of density: combined_score = `-(error + speedup_penalty)`, "
                f"speedup_penalty = `100 * max(0, 1/speedup - 1/{format(speedup_target, 'g')})`, where speedup is the "
                "measured decode speedup of your selections (sparse-decode kernel vs dense attention). The density "
                "penalty does not apply; the density target still sizes `budget(inp)`. Fewer distinct KV rows per "
                "GQA group (low kv_density) is what makes decoding faster.")
    return "- This run ranks by density; kv_density (below) is reported, not scored."


def render_prompt(
    parent_code: str,
    parent_score: Any = None,
    *,
    parent_id: str = "",
    density_target: float = 0.10,
    objective: str = "density",
    speedup_target: float | None = None,
    failures: Sequence[Any] = (),
    top: Sequence[Any] = (),
    diverse: Sequence[Any] = (),
    notes: Sequence[str] = (),
    template_dir: Path | str | None = None,
) -> Prompt:
    """Render the system and user prompts from plain data.

    ``parent_score`` is a ScoreReport dict (or the report itself); ``failures`` are strings or
    dicts with summary/category/reason/details; ``top``/``diverse`` are dicts with id, code,
    combined_score, error, density and optional summary; ``notes`` are human review notes.
    """
    system_values = {"density_target": format(density_target, "g"), "entry_point": ENTRY_POINT,
                     "objective": objective_text(objective, speedup_target)}
    user_values = {
        "parent_id": parent_id,
        "parent_code": parent_code.strip("\n"),
        "parent_score": format_score(parent_score),
        "failures": format_failures(failures),
        "top_inspirations": format_inspirations(top),
        "diverse_inspirations": format_inspirations(diverse),
        "notes": "\n".join(f"- {n.strip()}" for n in notes if n.strip()) or NONE_TEXT,
        "density_target": system_values["density_target"],
    }
    system = _substitute(load_template(SYSTEM_TEMPLATE, template_dir), SYSTEM_TEMPLATE, system_values)
    user = _substitute(load_template(USER_TEMPLATE, template_dir), USER_TEMPLATE, user_values)
    return Prompt(system=system, user=user)
