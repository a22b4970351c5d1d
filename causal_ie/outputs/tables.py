"""Markdown tables and the one number format of reports and summaries.

results.json stores a value's 95 % interval as sibling keys ``<key>_ci_low`` /
``<key>_ci_high`` (:mod:`causal_ie.outputs.schema`). Reports show it in the
value's own cell, ``0.832 [0.784, 0.875]``, never as rows or columns of their
own: every table of report.md and of a sweep summary takes its cells from
:func:`result_cells` (all values of a mapping), :func:`result_cell` (one key)
or :func:`results_table` (rows of mappings), which fold the bounds in through
:func:`fold_intervals`. Undefined values (NaN, missing) print as ``n/a``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from causal_ie.outputs.results import flatten

CI_LOW, CI_HIGH = "_ci_low", "_ci_high"
CI_SUFFIXES = (CI_LOW, CI_HIGH)
MISSING = "n/a"  # how a NaN or absent value prints


def is_missing(value: Any) -> bool:
    """None or a NaN float: a value a table shows as :data:`MISSING`."""
    return value is None or (_is_float(value) and math.isnan(value))


def _is_float(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral)


def fmt(value: Any, digits: int = 3) -> str:
    """Floats with ``digits`` decimals, NaN and None as ``n/a``, everything else as ``str``."""
    if is_missing(value):
        return MISSING
    if _is_float(value):
        return f"{float(value):.{digits}f}"
    return str(value)


def fmt_interval(value: Any, low: Any = None, high: Any = None, digits: int = 3) -> str:
    """``0.812 [0.780, 0.841]``: a value with its 95 % interval; the value alone when a bound
    is missing or NaN; ``n/a`` when the value is."""
    if is_missing(value):
        return MISSING
    if is_missing(low) or is_missing(high):
        return fmt(value, digits)
    return f"{fmt(value, digits)} [{fmt(low, digits)}, {fmt(high, digits)}]"


def is_interval_bound(key: str) -> bool:
    """Whether ``key`` names an interval bound (ends in ``_ci_low`` or ``_ci_high``)."""
    return str(key).endswith(CI_SUFFIXES)


def fold_intervals(flat: Mapping[str, Any], digits: int = 3) -> dict[str, Any]:
    """``flat`` without its interval bounds: a key with both siblings ``<key>_ci_low`` /
    ``<key>_ci_high`` becomes its formatted cell (:func:`fmt_interval`), the bounds are dropped
    (also a bound whose key is absent), every other value is kept as it is. Order is kept."""
    folded: dict[str, Any] = {}
    for key, value in flat.items():
        if is_interval_bound(key):
            continue
        low, high = flat.get(f"{key}{CI_LOW}"), flat.get(f"{key}{CI_HIGH}")
        folded[key] = value if low is None or high is None else fmt_interval(value, low, high, digits)
    return folded


def result_cells(results: Mapping[str, Any], digits: int = 3) -> Iterator[tuple[str, str]]:
    """``(key, cell)`` for every value of a results mapping, in order: the cell is the value
    formatted by :func:`fmt`, with its interval folded in when the mapping holds the
    sibling bounds ``<key>_ci_low`` / ``<key>_ci_high`` (``0.998 [0.989, 1.000]``); bounds get
    no pair of their own. A nested mapping is flattened first (keys joined with dots, as
    :func:`causal_ie.outputs.results.flatten` does), so both ``results["classification"]["auroc"]``
    (keys: findings) and a whole results.json work::

        markdown_table(["finding", "AUROC"], result_cells(results["classification"]["auroc"]))
    """
    for key, value in fold_intervals(flatten(results), digits).items():
        yield key, fmt(value, digits)


def result_cell(results: Mapping[str, Any], key: str, digits: int = 3) -> str:
    """The cell of one ``key`` of ``results`` (the mapping that holds it and its bounds, or a
    flattened mapping with a flattened key): as :func:`result_cells`; ``n/a`` when absent."""
    return fmt_interval(results.get(key), results.get(f"{key}{CI_LOW}"), results.get(f"{key}{CI_HIGH}"), digits)


def value_columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """The keys holding a value (not a section, not a bound) in any of ``rows``, in order of first use."""
    keys: dict[str, None] = {}
    for row in rows:
        keys.update((k, None) for k, v in row.items() if not isinstance(v, Mapping) and not is_interval_bound(k))
    return list(keys)


def results_table(
    label: str,
    rows: Mapping[str, Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    titles: Mapping[str, str] | None = None,
    digits: int = 3,
) -> str:
    """A markdown table with one row per entry of ``rows`` (first column ``label``: the entry's
    name) and one column per key of ``columns`` (default :func:`value_columns`; ``titles``
    renames headers); each cell is :func:`result_cell` of that row's mapping, interval folded
    in, ``n/a`` where the row lacks the key."""
    columns = list(columns) if columns is not None else value_columns(rows.values())
    titles = titles or {}
    return markdown_table(
        [label, *(titles.get(c, c) for c in columns)],
        ([name, *(result_cell(row, c, digits) for c in columns)] for name, row in rows.items()),
        digits,
    )


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
