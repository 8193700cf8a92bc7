"""Plain-text tables for terminal reports and markdown summaries."""
from __future__ import annotations


def _decimals(values) -> int:
    """Decimals for a column of floats: the same for every row, chosen by the column's largest value."""
    top = max((abs(v) for v in values if v == v), default=0.0)
    return 4 if top < 1 else 3 if top < 100 else 1 if top < 1e4 else 0


def _fmt(v, decimals=None):
    if isinstance(v, float):
        if decimals is None:
            decimals = _decimals([v])
        return f"{v:,.{decimals}f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return "" if v is None else str(v)


def format_table(headers, rows, markdown: bool = False) -> str:
    """Render ``rows`` (lists of values) under ``headers`` as aligned text, or as a markdown table.

    Integers get thousands separators; the floats of a column all get the same number of decimals.
    """
    columns = list(zip(*rows)) if rows else []
    decimals = [_decimals([v for v in col if isinstance(v, float)]) for col in columns]
    cells = [[_fmt(v, decimals[i]) for i, v in enumerate(r)] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in cells]
        return "\n".join(lines)
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h))
              for i, h in enumerate(headers)]
    def line(vals):
        return "  ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])
