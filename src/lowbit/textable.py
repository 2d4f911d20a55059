"""One plain-text table formatter for every table lowbit prints (quantize summary, inspect, demo)."""
from __future__ import annotations

from typing import Sequence


def text_table(headers: Sequence[str], rows: Sequence[Sequence[object]], numeric: Sequence[bool] | None = None,
               max_width: int = 48) -> str:
    """Columns sized to their content (text cut from the left beyond ``max_width``); numeric
    columns right-aligned. Values are printed with `str`: format numbers before passing them."""
    numeric = list(numeric) if numeric is not None else [False] * len(headers)
    cells = [[_cut(str(v), max_width) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()
    head = line(list(headers))
    return "\n".join([head, "-" * len(head)] + [line(r) for r in cells])


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]
