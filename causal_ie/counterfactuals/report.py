"""The counterfactual study's part of report.md and its figures (a ReportSection)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from causal_ie.counterfactuals.figures import plot_counterfactuals, plot_mass_shares
from causal_ie.outputs.report import Figures
from causal_ie.outputs.tables import markdown_table, result_cell, results_table

COLUMNS = ("n", "confidence_before", "confidence_after", "success_rate", "l0", "l1_5", "box_mass_share")


class CounterfactualReport:
    """One row per method, the shortcut comparison; the counterfactual figure and mass shares.

    Artefacts (from :func:`causal_ie.counterfactuals.command.run_counterfactuals`): ``rows``
    (figure rows: image, boxes, CE map, each method's counterfactual), ``methods`` and
    ``direction``.
    """

    name = "counterfactual"
    headline = ("counterfactual.svce.success_rate", "counterfactual.svce.box_mass_share")

    def markdown(self, results: Mapping[str, Any]) -> list[str]:
        summary = results.get("counterfactual")
        if not summary:
            return []
        cols = [c for c in COLUMNS if any(c in s for s in summary.values())]
        parts = [
            "## Counterfactuals",
            "",
            "confidence: the target finding's probability before/after; success: the counterfactual "
            "crossed 0.5 in the asked direction; l0/l1_5: size of the change; box_mass_share: share of "
            "the change inside the lesion box.",
            "",
            results_table("method", summary, cols),
            "",
        ]
        shortcut = {m: s["shortcut"] for m, s in summary.items() if "shortcut" in s}
        if shortcut:
            finding = next(iter(shortcut.values()))["finding"]
            rows = [
                [m, result_cell(v, "marker_mass_share"), result_cell(v, "marker_mass_share_other_findings"),
                 f"{v['n_with_marker']} / {v['n_with_marker_other_findings']}"]
                for m, v in shortcut.items()
            ]
            parts += [
                f"Share of the change on the planted marker: counterfactuals for {finding} (the finding the "
                "marker was planted with) against those for the other findings.",
                "",
                markdown_table(["method", finding, "other findings", f"pairs with marker ({finding} / others)"], rows),
                "",
            ]
        return parts

    def write_artefacts(self, out_dir: Path, results: Mapping[str, Any], artefacts: Mapping[str, Any]) -> Figures:
        fig_dir = out_dir / "figures"
        direction = artefacts["direction"]
        return {
            f"Counterfactuals ({direction}): image with lesion box (green) and marker (orange), "
            "then per method the counterfactual and its change": plot_counterfactuals(
                artefacts["rows"], artefacts["methods"], fig_dir / "counterfactuals.png"
            ),
            "Share of the change inside the lesion box and on the marker, per finding": plot_mass_shares(
                results["counterfactual"], fig_dir / "mass_shares.png"
            ),
        }
