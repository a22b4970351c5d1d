"""Checks of config values with errors that name the key: numbers, counts, shares, choices (one or
several), norms.

Each takes the key as the user writes it (``attack.eps``, ``model.adv_train.steps``) and
returns the value in its plain type, or raises ValueError saying what was expected. Booleans
are not numbers here (``true`` for an eps is a typo), and a count must be whole (2.5 steps is a
typo, not 2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

# how users spell the two norms of the attacks
NORMS = {"linf": "Linf", "inf": "Linf", "l_inf": "Linf", "l2": "L2"}


def number(
    key: str, value: Any, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite float in the range [low, high] (ends open with ``*_open``)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number, got {value!r}") from None
    below = out < low or (low_open and out == low)
    above = out > high or (high_open and out == high)
    if not math.isfinite(out) or below or above:
        raise ValueError(f"{key} must be {_range(low, high, low_open, high_open)}, got {value!r}")
    return out


def count(key: str, value: Any, minimum: int = 1) -> int:
    """``value`` as a whole number >= ``minimum``."""
    out = number(key, value)
    if out != int(out) or out < minimum:
        raise ValueError(f"{key} must be a whole number >= {minimum}, got {value!r}")
    return int(out)


def share(key: str, value: Any) -> float:
    """``value`` as a share in [0, 1]."""
    return number(key, value, 0.0, 1.0)


def choice(key: str, value: Any, options: Sequence[str]) -> str:
    """``value`` as one of ``options`` (exact spelling)."""
    if value not in options:
        raise ValueError(f"{key}={value!r}: expected one of {', '.join(map(str, options))}")
    return str(value)


def subset(key: str, values: Any, options: Sequence[str], wildcard: str | None = "*") -> list[str]:
    """``values`` (one string or a list) as a non-empty list, each one of ``options`` or
    ``wildcard`` (``data.views=[PA, AP]``, ``'*'``)."""
    out = [values] if isinstance(values, str) else [str(v) for v in values]
    allowed = [*options, *([wildcard] if wildcard else [])]
    if not out or any(v not in allowed for v in out):
        raise ValueError(f"{key}={out}: each must be one of {', '.join(map(str, allowed))}")
    return out


def norm(key: str, value: Any) -> str:
    """``Linf`` or ``L2`` from any of their usual spellings (case-insensitive)."""
    out = NORMS.get(str(value).lower()) if value is not None else None
    if out is None:
        raise ValueError(f"{key}={value!r}: expected Linf or L2")
    return out


def _range(low: float, high: float, low_open: bool, high_open: bool) -> str:
    if math.isinf(high):
        return "a finite number" if math.isinf(low) else f"a finite number {'>' if low_open else '>='} {low:g}"
    if math.isinf(low):
        return f"a finite number {'<' if high_open else '<='} {high:g}"
    return f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
