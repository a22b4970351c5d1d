"""The localisation study's part of report.md and its figures (a ReportSection)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from causal_ie.explain.figures import plot_examples, plot_method_scores
from causal_ie.outputs.report import Figures
from causal_ie.outputs.tables import markdown_table, result_cell, result_cells, results_table, value_columns

TABLE_THRESHOLDS = (0.1, 0.3, 0.5, 0.7)


def method_table(results: Mapping[str, Any], thresholds: Sequence[float] = TABLE_THRESHOLDS) -> str:
    """Localisation and faithfulness per explanation method, each score with its 95 % interval
    where results.json holds one."""
    loc = results.get("localisation", {})
    faith = results.get("faithfulness", {})
    cols = ["pointing_game", "energy_pointing_game", *(f"iobb@{t:g}" for t in thresholds), *(f"iou@{t:g}" for t in thresholds)]
    rows = {m: {**loc.get(m, {}), **faith.get(m, {})} for m in dict.fromkeys([*loc, *faith])}
    return results_table("method", rows, [*cols, "deletion_auc", "insertion_auc"])


def difference_table(results: Mapping[str, Any]) -> str | None:
    """Every CE method's ``minus.<method>`` differences (pointing game, IoBB@T) to each other
    method on the same pairs, with their paired intervals; None when there are none."""
    rows = {
        (method, other): diff
        for method, scores in results.get("localisation", {}).items()
        for other, diff in scores.get("minus", {}).items()
    }
    if not rows:
        return None
    cols = value_columns(rows.values())
    return markdown_table(
        ["CE method", "minus method", *cols],
        ([method, other, *(result_cell(diff, c) for c in cols)] for (method, other), diff in rows.items()),
    )


def classification_table(cls: Mapping[str, Any]) -> str:
    """AUROC per finding, then their mean, each with its interval."""
    rows = [*result_cells(cls.get("auroc", {})), ("mean", result_cell(cls, "auroc_mean"))]
    return markdown_table(["finding", "AUROC"], rows)


class LocalisationReport:
    """Classification AUROC, localisation and faithfulness per method; example maps and score bars.

    Artefacts (from :class:`causal_ie.lightning.evaluation.CEEvaluation`): ``examples``, a few
    (image, box, maps) per finding, drawn ``rows_per_figure`` to a PNG.
    """

    name = "localisation"
    headline = ("classification.auroc_mean", "localisation.ce.pointing_game", "localisation.gradcam.pointing_game",
                "faithfulness.ce.deletion_auc")

    def __init__(self, rows_per_figure: int = 6):
        self.rows_per_figure = rows_per_figure

    def markdown(self, results: Mapping[str, Any]) -> list[str]:
        parts: list[str] = []
        cls = results.get("classification", {})
        if cls:
            parts += [f"Classification: mean AUROC {result_cell(cls, 'auroc_mean')} on {cls.get('num_images', '?')} "
                      "test images (brackets: 95 % patient-bootstrap intervals).", ""]
            if cls.get("auroc"):
                parts += [classification_table(cls), ""]
        if results.get("localisation") or results.get("faithfulness"):
            parts += [
                f"## Localisation and faithfulness ({results.get('localisation_pairs', '?')} image-finding pairs with a box)",
                "",
                "Pointing game: share of maps whose maximum lies in the box. IoBB/IoU@T: overlap of the "
                "boxes around the map's regions above T (min-max normalised map) with the lesion box "
                "(Wang et al. 2017). Deletion/insertion AUC: prediction of the finding as pixels are "
                "removed/inserted in map order (lower/higher is better). Brackets: 95 % patient-bootstrap "
                "intervals.",
                "",
                method_table(results),
                "",
            ]
            differences = difference_table(results)
            if differences:
                parts += [
                    "Differences on the same pairs (CE method minus the other method; 95 % paired "
                    "patient-bootstrap intervals):",
                    "",
                    differences,
                    "",
                ]
        return parts

    def write_artefacts(self, out_dir: Path, results: Mapping[str, Any], artefacts: Mapping[str, Any]) -> Figures:
        examples: list[dict[str, Any]] = list(artefacts.get("examples", []))
        fig_dir = out_dir / "figures"
        figures: Figures = {}
        methods = list(examples[0]["maps"]) if examples else []
        for start in range(0, len(examples), self.rows_per_figure):
            chunk = examples[start : start + self.rows_per_figure]
            findings = ", ".join(dict.fromkeys(ex["finding"] for ex in chunk))
            path = fig_dir / f"maps_{start // self.rows_per_figure:02d}.png"
            figures[f"CE maps and CAMs: {findings}"] = plot_examples(chunk, methods, path)
        scores = plot_method_scores(results, fig_dir / "method_scores.png")
        if scores is not None:
            figures["Scores per method"] = scores
        return figures

