"""Plain-text tables and number formatting for benchmark output."""
from __future__ import annotations

from collections.abc import Sequence

MIB = 2**20


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]],
                 align: str | None = None) -> str:
    """Columns padded to their widest cell, a dashed rule under the header.

    `align` has one character per column, "l" or "r" (default: first column left, the rest
    right). Cells are str()-ed; a row shorter than the header is padded with blanks.
    """
    n = len(headers)
    if align is None:
        align = "l" + "r" * (n - 1)
    if len(align) != n or set(align) - {"l", "r"}:
        raise ValueError(f"align={align!r} needs one 'l' or 'r' per column ({n} columns)")
    cells = [[str(h) for h in headers]]
    for row in rows:
        if len(row) > n:
            raise ValueError(f"row {list(row)!r} has {len(row)} cells, the header {n}")
        cells.append([str(c) for c in row] + [""] * (n - len(row)))
    widths = [max(len(r[i]) for r in cells) for i in range(n)]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w)
                         for c, w, a in zip(r, widths, align)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def mib(nbytes: float) -> str:
    return f"{nbytes / MIB:,.1f}"


def seconds(s: float) -> str:
    return f"{s:.3f}"


def ratio(x: float) -> str:
    return f"{x:.2f}x"
