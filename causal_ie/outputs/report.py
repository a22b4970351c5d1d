"""report.md: a title, the run's settings, then one section per experiment with its figures.

An experiment contributes a :class:`ReportSection`: the markdown it adds for
the results it produced (cells from :mod:`causal_ie.outputs.tables`, which shows
every interval in its value's cell), and the artefacts (figures, data files) it
writes from what the run kept in memory. The entry point that composed the run passes its
sections to :func:`write_artefacts` and :func:`write_report`; this module never
imports an experiment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from causal_ie.io import atomic_write_text
from causal_ie.outputs.tables import markdown_table, result_cells

REPORT_FILE = "report.md"

Figures = dict[str, Path]  # caption -> PNG


class ReportSection(Protocol):
    """One experiment's part of a run's outputs."""

    name: str  # the key of this section's in-memory artefacts, e.g. "localisation", "attack"

    def markdown(self, results: Mapping[str, Any]) -> list[str]:
        """report.md lines for ``results`` ([] when the results hold nothing of this section)."""

    def write_artefacts(self, out_dir: Path, results: Mapping[str, Any], artefacts: Mapping[str, Any]) -> Figures:
        """Write this section's files (PNGs under ``out_dir/figures``, data files) from the run's
        ``results`` and ``artefacts`` (what the run kept in memory for this section); return the
        figures to show, caption -> path."""


def write_artefacts(
    out_dir: str | Path,
    sections: Sequence[ReportSection],
    results: Mapping[str, Any],
    artefacts: Mapping[str, Mapping[str, Any]],
) -> dict[str, Figures]:
    """Every section's artefacts: ``{section name: {caption: path}}`` (a section without
    artefacts in this run writes nothing)."""
    out_dir = Path(out_dir)
    return {s.name: s.write_artefacts(out_dir, results, artefacts[s.name]) for s in sections if artefacts.get(s.name)}


def run_table(results: Mapping[str, Any]) -> list[str]:
    """The ``run`` block (settings of the run) as a two-column table."""
    run = results.get("run")
    if not run:
        return []
    return [markdown_table(["setting", "value"], result_cells(run)), ""]


def figure_lines(out_dir: Path, figures: Mapping[str, Path]) -> list[str]:
    lines = []
    for caption, path in figures.items():
        rel = Path(path).relative_to(out_dir) if Path(path).is_absolute() else Path(path)
        lines += [f"### {caption}", "", f"![{caption}]({rel.as_posix()})", ""]
    return lines


def write_report(
    out_dir: str | Path,
    results: Mapping[str, Any],
    sections: Sequence[ReportSection],
    figures: Mapping[str, Mapping[str, Path]] | None = None,
    title: str = "causal-ie evaluation",
) -> Path:
    """``report.md`` beside ``results.json``: the run's settings, then each section's markdown
    followed by its figures (``figures`` as :func:`write_artefacts` returns them)."""
    out_dir = Path(out_dir)
    figures = figures or {}
    parts = [f"# {title}", "", *run_table(results)]
    for section in sections:
        parts += section.markdown(results)
        parts += figure_lines(out_dir, figures.get(section.name, {}))
    return atomic_write_text(out_dir / REPORT_FILE, "\n".join(parts))
