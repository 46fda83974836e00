"""Render a genome as an ordinary, hand-patchable EVOLVE block, and read one back.

The block starts with the genome as a JSON comment; its tunable numbers are top-level
constants (so the offline mutator and a human can tune them). Reading a block back takes the
structure from the comment and the numbers from the constants, and accepts the result only
if rendering it reproduces the block: a block whose code was edited by hand is not a genome.
"""
from __future__ import annotations

import ast
import dataclasses

from adrs.structural.genome import (
    Allocation, Genome, GenomeError, Scorer, Sink, Threshold, describe, from_json, to_json,
)
from evaluator.candidate import parse_source

GENOME_PREFIX = "# structural-genome: "
SHARE_NAMES = {"window": "WINDOW_SHARE", "topk": "TOPK_SHARE", "threshold": "THRESHOLD_SHARE", "sample": "SAMPLE_SHARE"}
SCORER_CONSTANT = {"lowrank": ("SKETCH_RANK", "rank"), "lowprec": ("KEY_BITS", "bits"), "pages": ("PAGE_SIZE", "page")}

_SCORERS = {
    "exact": '''
def token_scores(inp: MaskerInput) -> torch.Tensor:
    """Exact attention logits (an oracle: it reads every key)."""
    return attention_logits(inp)
''',
    "lowrank": '''
def token_scores(inp: MaskerInput) -> torch.Tensor:
    """Approximate logits from each query's SKETCH_RANK largest-magnitude dimensions (SparQ-style)."""
    q = inp.queries.float()
    top = q.abs().topk(min(SKETCH_RANK, q.shape[-1]), dim=-1).indices
    q_sketch = torch.zeros_like(q).scatter(-1, top, q.gather(-1, top))
    keys = expand_kv(inp.keys, inp.num_heads).float()
    scores = torch.matmul(q_sketch, keys.transpose(-1, -2)) * inp.scaling
    return scores.masked_fill(~causal_mask(inp), float("-inf"))
''',
    "lowprec": '''
def token_scores(inp: MaskerInput) -> torch.Tensor:
    """Logits against keys quantised to KEY_BITS bits per channel (a low-precision key sketch)."""
    keys = inp.keys.float()
    levels = 2 ** (KEY_BITS - 1) - 1
    scale = keys.abs().amax(dim=2, keepdim=True).clamp(min=1e-6) / levels
    sketch = expand_kv(torch.round(keys / scale) * scale, inp.num_heads)
    scores = torch.matmul(inp.queries.float(), sketch.transpose(-1, -2)) * inp.scaling
    return scores.masked_fill(~causal_mask(inp), float("-inf"))
''',
    "pages": '''
def token_scores(inp: MaskerInput) -> torch.Tensor:
    """Quest-style bound: every key scores its page's upper bound sum(max(q * kmin, q * kmax))."""
    b, h, q, d = inp.queries.shape
    n = inp.num_keys
    n_pages = -(-n // PAGE_SIZE)
    keys = expand_kv(inp.keys, h).float()
    keys = torch.nn.functional.pad(keys, (0, 0, 0, n_pages * PAGE_SIZE - n))  # zeros keep the bound valid
    pages = keys.view(b, h, n_pages, PAGE_SIZE, d)
    kmin, kmax = pages.amin(3)[:, :, None], pages.amax(3)[:, :, None]  # [b, h, 1, pages, d]
    qf = inp.queries.float()[:, :, :, None, :]
    bound = torch.maximum(qf * kmin, qf * kmax).sum(-1) * inp.scaling  # [b, h, q, pages]
    scores = bound.repeat_interleave(PAGE_SIZE, dim=-1)[..., :n]
    return scores.masked_fill(~causal_mask(inp), float("-inf"))
''',
}

_ENTROPY = '''
def head_weights(scores: torch.Tensor) -> torch.Tensor:
    """[b, h, q] budget multipliers averaging 1 over heads: heads with flatter scores get more."""
    entropy = torch.special.entr(torch.softmax(scores, dim=-1)).sum(-1)
    w = (entropy + 1e-6) ** ENTROPY_POWER
    return w / w.mean(dim=1, keepdim=True)
'''


def _count(genome: Genome, kind: str, name: str) -> str:
    """Source of the [.., q] token count of a share component (the last one takes the room left)."""
    if genome.last_share_kind() == kind:
        return "room"
    return f"torch.minimum((total.float() * {name}).long(), room)"


def _masker_body(genome: Genome) -> list[str]:
    lines = [
        "    b, h, q, n = inp.queries.shape[0], inp.num_heads, inp.queries.shape[2], inp.num_keys",
        "    total = budget(inp)  # [q] tokens per query at the density target",
        "    causal = causal_mask(inp)  # [q, k]",
        "    k = torch.arange(n, device=inp.keys.device)",
        "    pos = inp.query_positions.to(inp.keys.device)[:, None]",
        "    chosen = torch.zeros(b, h, q, n, dtype=torch.bool, device=inp.keys.device)",
    ]
    if genome.uses_scores:
        lines.append("    scores = token_scores(inp)  # [b, h, q, k], -inf where not causal")
        if genome.allocation.heads == "entropy":
            lines.append("    per_head = head_weights(scores)")
    for c in genome.components:
        if isinstance(c, Sink):
            lines += ["", "    # Attention sinks: the first keys.",
                      "    chosen |= (k < torch.clamp(total, max=SINK_TOKENS)[:, None]) & causal"]
            continue
        lines += ["", "    room = total - chosen.sum(-1)  # [b, h, q] budget left"]
        count = _count(genome, c.kind, SHARE_NAMES[c.kind])
        if c.kind == "window":
            lines += ["    # Recent window.", f"    n_window = {count}",
                      "    chosen |= (k > pos - n_window[..., None]) & causal"]
        elif c.kind in ("topk", "threshold"):
            lines.append("    free = scores.masked_fill(chosen, float('-inf'))")
            base = "room.float()" if count == "room" else f"total.float() * {SHARE_NAMES[c.kind]}"
            if genome.allocation.heads == "entropy":
                count = f"torch.minimum(({base} * per_head).long(), room)"
            if isinstance(c, Threshold):
                lines += ["    # Keys within THRESHOLD_MARGIN of the row's best remaining score, capped.",
                          "    near = (free >= free.amax(-1, keepdim=True) - THRESHOLD_MARGIN).sum(-1)",
                          f"    chosen |= top_per_query(free, torch.minimum(near, {count}))"]
            else:
                lines += ["    # Top-k by token_scores.", f"    chosen |= top_per_query(free, {count})"]
        else:
            lines += ["    # Uniform sample of the remaining causal keys, without replacement, weight 1/p.",
                      "    rest = causal & ~chosen",
                      "    n_rest = rest.sum(-1)",
                      f"    n_sample = torch.minimum({count}, n_rest)",
                      "    noise = torch.rand(chosen.shape, generator=inp.generator, device=inp.keys.device)",
                      "    sampled = top_per_query(noise.masked_fill(~rest, float('-inf')), n_sample)",
                      "    inverse_p = n_rest.float() / n_sample.clamp(min=1).float()  # p = n_sample / n_rest"]
    weights = "chosen.float() + sampled.float() * inverse_p[..., None]" if genome.get("sample") else "chosen.float()"
    lines += ["", f"    weights = {weights}",
              "    # Never leave a query empty: fall back to its own token.",
              "    empty = weights.sum(-1, keepdim=True) == 0",
              "    return weights + ((k == pos) & empty).float()"]
    return lines


def _constants(genome: Genome) -> list[tuple[str, int | float, str]]:
    out: list[tuple[str, int | float, str]] = []
    last = genome.last_share_kind()
    for c in genome.components:
        if isinstance(c, Sink):
            out.append(("SINK_TOKENS", c.tokens, ""))
        elif c.kind != last:
            out.append((SHARE_NAMES[c.kind], c.share, "  # fraction of each query's token budget"))
        if isinstance(c, Threshold):
            out.append(("THRESHOLD_MARGIN", c.margin, "  # in logits below the best remaining key"))
    if genome.uses_scores and genome.scorer.kind in SCORER_CONSTANT:
        name, field = SCORER_CONSTANT[genome.scorer.kind]
        out.append((name, getattr(genome.scorer, field), ""))
    if genome.uses_scores and genome.allocation.heads == "entropy":
        out.append(("ENTROPY_POWER", genome.allocation.power, ""))
    return out


def render_block(genome: Genome) -> str:
    """The EVOLVE block for ``genome``: imports, constants, helpers and ``masker``."""
    names = ["budget", "causal_mask", "top_per_query"]
    if genome.uses_scores:
        names += {"exact": ["attention_logits"], "pages": ["expand_kv"]}.get(genome.scorer.kind, ["expand_kv"])
    consts = _constants(genome)
    last = genome.last_share_kind()
    lines = [GENOME_PREFIX + to_json(genome),
             f"from evaluator.contract import {', '.join(sorted(set(names)))}", ""]
    lines += [f"{name} = {value!r}{comment}" for name, value, comment in consts]
    if last is not None:
        lines.append(f"# The {last} takes the rest of the budget.")
    text = "\n".join(lines) + "\n\n"
    if genome.uses_scores:
        text += _SCORERS[genome.scorer.kind] + "\n"
        if genome.allocation.heads == "entropy":
            text += _ENTROPY + "\n"
    # Structure only, no numbers: tuning a constant must not make the docstring stale.
    doc = "Generated by the structural mutator: " + describe(genome, numbers=False)
    text += f'\ndef masker(inp: MaskerInput) -> Selection:\n    """{doc}."""\n' + "\n".join(_masker_body(genome)) + "\n"
    return text


def top_level_numbers(tree: ast.Module) -> dict[str, int | float]:
    """``NAME = <number>`` assignments at the top of a parsed block (hand- or offline-tuned constants)."""
    out: dict[str, int | float] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            try:
                value = ast.literal_eval(stmt.value)
            except ValueError:
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[stmt.targets[0].id] = value
    return out


def with_constants(genome: Genome, numbers: dict[str, int | float]) -> Genome:
    """``genome`` with the values of the block's top-level constants (hand- or offline-tuned)."""
    comps = []
    for c in genome.components:
        if isinstance(c, Sink) and "SINK_TOKENS" in numbers:
            c = dataclasses.replace(c, tokens=numbers["SINK_TOKENS"])
        elif c.kind in SHARE_NAMES and SHARE_NAMES[c.kind] in numbers:
            c = dataclasses.replace(c, share=numbers[SHARE_NAMES[c.kind]])
        if isinstance(c, Threshold) and "THRESHOLD_MARGIN" in numbers:
            c = dataclasses.replace(c, margin=numbers["THRESHOLD_MARGIN"])
        comps.append(c)
    scorer = genome.scorer
    if scorer.kind in SCORER_CONSTANT and SCORER_CONSTANT[scorer.kind][0] in numbers:
        name, field = SCORER_CONSTANT[scorer.kind]
        scorer = dataclasses.replace(scorer, **{field: numbers[name]})
    allocation = genome.allocation
    if "ENTROPY_POWER" in numbers:
        allocation = Allocation(allocation.heads, numbers["ENTROPY_POWER"])
    return Genome(tuple(comps), Scorer(**dataclasses.asdict(scorer)), allocation)


def _without_genome_line(block: str) -> str:
    return "".join(line for line in block.splitlines(keepends=True) if not line.startswith(GENOME_PREFIX)).strip()


def read_genome(block: str) -> Genome | None:
    """The genome a rendered block holds (numbers from its constants), or None if it is not one."""
    line = next((ln for ln in block.splitlines() if ln.startswith(GENOME_PREFIX)), None)
    if line is None:
        return None
    try:
        genome = with_constants(from_json(line[len(GENOME_PREFIX):]), top_level_numbers(parse_source(block)))
        rendered = render_block(genome)
    except (GenomeError, SyntaxError, TypeError, ValueError, KeyError):
        return None
    return genome if _without_genome_line(rendered) == _without_genome_line(block) else None
