"""The localisation study's part of report.md and its figures (a ReportSection)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from causal_ie.explain.figures import plot_examples, plot_method_scores
from causal_ie.outputs.report import Figures
from causal_ie.outputs.tables import fmt, markdown_table

TABLE_THRESHOLDS = (0.1, 0.3, 0.5, 0.7)


def method_table(results: Mapping[str, Any], thresholds: Sequence[float] = TABLE_THRESHOLDS) -> str:
    """Localisation and faithfulness per explanation method."""
    loc = results.get("localisation", {})
    faith = results.get("faithfulness", {})
    cols = ["pointing_game", "energy_pointing_game", *(f"iobb@{t:g}" for t in thresholds), *(f"iou@{t:g}" for t in thresholds)]
    nan = float("nan")
    rows = [
        [m, *(loc.get(m, {}).get(c, nan) for c in cols), *(faith.get(m, {}).get(c, nan) for c in ("deletion_auc", "insertion_auc"))]
        for m in dict.fromkeys([*loc, *faith])
    ]
    return markdown_table(["method", *cols, "deletion_auc", "insertion_auc"], rows)


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
            parts += [f"Classification: mean AUROC {fmt(cls.get('auroc_mean'))} on {cls.get('num_images', '?')} test images.", ""]
            if cls.get("auroc"):
                parts += [markdown_table(["finding", "AUROC"], cls["auroc"].items()), ""]
        if results.get("localisation") or results.get("faithfulness"):
            parts += [
                f"## Localisation and faithfulness ({results.get('localisation_pairs', '?')} image-finding pairs with a box)",
                "",
                "Pointing game: share of maps whose maximum lies in the box. IoBB/IoU@T: overlap of the "
                "boxes around the map's regions above T (min-max normalised map) with the lesion box "
                "(Wang et al. 2017). Deletion/insertion AUC: prediction of the finding as pixels are "
                "removed/inserted in map order (lower/higher is better).",
                "",
                method_table(results),
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

