"""Errors for bad input data, the raise-or-skip policy of `data.on_error`, and the checks every
metadata table gets (readable, its columns there), named by file."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Input data is missing or malformed. The message names the file or field."""


def find_metadata(root: str | Path, names: Sequence[str], what: str, layout: str) -> Path:
    """The first of ``names`` that is a file under ``root`` (``data.root``), or DataError: the
    folder missing (with the ``layout`` it should hold) or the files looked for."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"the {what} folder {root} (data.root) does not exist; it should hold {layout}")
    for name in names:
        if (root / name).is_file():
            return root / name
    raise DataError(f"no {what} metadata in {root} (data.root): looked for {', '.join(names)}; it should hold {layout}")


def read_table(path: str | Path, what: str, **kwargs: Any) -> Any:
    """``pandas.read_csv(path, **kwargs)``, or DataError naming ``what`` and the file."""
    import pandas as pd

    try:
        return pd.read_csv(path, **kwargs)
    except (OSError, EOFError, UnicodeDecodeError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"cannot read the {what} {path}: {exc}") from None


def require_columns(path: str | Path, found: Iterable[Any], needed: Sequence[str], what: str) -> None:
    """DataError naming the file, the missing columns and the ones found, unless all of ``needed``
    are among ``found``; ``what`` says what such a file holds ("an RSNA labels file has ...")."""
    found = [str(c) for c in found]
    missing = [c for c in needed if c not in found]
    if missing:
        raise DataError(f"{path} lacks column(s) {', '.join(missing)}; {what} (found {', '.join(found)})")


class ProblemLog:
    """Collects data problems; raises at once (`on_error="raise"`) or counts and skips.

    Problems are grouped by kind ("missing image", "unreadable image", ...), so
    a summary can say how many files of each kind were skipped and name a few.
    """

    def __init__(self, on_error: str = "raise", hint: str = "data.on_error=skip"):
        if on_error not in ("raise", "skip"):
            raise DataError(f"data.on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.hint = hint
        self.problems: dict[str, list[str]] = defaultdict(list)

    def report(self, kind: str, item: str, detail: str = "") -> None:
        msg = f"{kind}: {item}" + (f" ({detail})" if detail else "")
        if self.on_error == "raise":
            raise DataError(f"{msg}. Fix the data or set {self.hint} to skip such files.")
        self.problems[kind].append(item)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.problems.values())

    def summary(self) -> str:
        parts = []
        for kind, items in self.problems.items():
            shown = ", ".join(items[:5]) + (", ..." if len(items) > 5 else "")
            parts.append(f"{len(items)} x {kind} [{shown}]")
        return "; ".join(parts)

    def log_summary(self) -> None:
        if self.count:
            log.warning("skipped %d problem file(s): %s", self.count, self.summary())

    def as_dict(self, examples: int = 5) -> dict[str, dict[str, Any]]:
        """JSON-ready counts: ``{"skipped": {kind: n}, "skipped_examples": {kind: [first items]}}``."""
        return {
            "skipped": {kind: len(items) for kind, items in self.problems.items()},
            "skipped_examples": {kind: list(items[:examples]) for kind, items in self.problems.items()},
        }
