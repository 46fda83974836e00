"""Plain aligned columns: one line per row, readable in an 80-column terminal and when piped.

Rich tables shrink every column to fit the terminal, which cut ids to ``c0000…`` and wrapped
summaries over several lines. Here every column but the last keeps its full width; only the
last (free text) is shortened, and only on a terminal. Piped output is never cut.
"""
from __future__ import annotations

from typing import Sequence

GAP = "  "


def format_columns(headers: Sequence[str], rows: Sequence[Sequence[str]], width: int | None = None,
                   right: Sequence[str] = ()) -> list[str]:
    """Header and rows as aligned lines; the last column is cut (with '…') to ``width`` when given.

    Columns named in ``right`` are right-aligned (numbers). Cells must already be terminal-safe.
    """
    cells = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers) - 1)]
    lines = []
    for row in cells:
        parts = [row[i].rjust(w) if headers[i] in right else row[i].ljust(w) for i, w in enumerate(widths)]
        head = GAP.join(parts) + GAP
        last = row[-1].replace("\n", " ")
        if width is not None and len(head) + len(last) > width:
            room = width - len(head)
            last = (last[: room - 1] + "…") if room > 1 else ""
        lines.append((head + last).rstrip())
    return lines
