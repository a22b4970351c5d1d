"""Markdown tables and the one number format of reports and summaries."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any


def fmt(value: Any, digits: int = 3) -> str:
    """Floats with ``digits`` decimals (``nan`` for NaN), everything else as ``str``."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def fmt_interval(value: Any, low: Any = None, high: Any = None, digits: int = 3) -> str:
    """``0.812 [0.780, 0.841]``: a value with its 95 % interval, or the value alone without one."""
    if low is None or high is None:
        return fmt(value, digits)
    return f"{fmt(value, digits)} [{fmt(low, digits)}, {fmt(high, digits)}]"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 3) -> str:
    """A GitHub markdown table; cells go through :func:`fmt` (pipes in text are escaped)."""
    header = [str(h) for h in header]

    def cell(value: Any) -> str:
        return fmt(value, digits).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        row = list(row)
        if len(row) != len(header):
            raise ValueError(f"table row has {len(row)} cells for {len(header)} columns: {row}")
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)
