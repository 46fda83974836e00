"""Making candidate-controlled text inert before a terminal or rich renders it.

Error messages, tracebacks, prints, summaries and code come from untrusted candidates (and
from an LLM a prompt may have poisoned). Shown raw, an escape sequence could retitle the
terminal, clear it, or forge output, and rich would interpret ``[link=...]`` markup. JSON
output is not passed through here: ``json.dumps`` already escapes control characters and
keeps the exact text.
"""
from __future__ import annotations

from rich.markup import escape


def _visible(ch: str) -> str:
    """A control or format character (ESC, BEL, bidi overrides...) as a visible escape."""
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def terminal_safe(text: object, markup: bool = True) -> str:
    """``text`` with control characters escaped (newlines and tabs kept) and, for rich
    (``markup=True``), square brackets escaped so no markup is interpreted."""
    s = str(text)
    if not (s.isprintable() and "[" not in s):
        s = "".join(ch if ch in "\n\t" or ch.isprintable() or ch == " " else _visible(ch) for ch in s)
    return escape(s) if markup else s
