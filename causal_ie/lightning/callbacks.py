"""CEMapLogger: CE maps and CAMs as PNGs, and to W&B / TensorBoard when those log."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib
import numpy as np

from causal_ie.report import flatten, plot_examples, plot_method_scores

log = logging.getLogger(__name__)


def heatmap_overlay(image: np.ndarray, cmap_map: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """uint8 RGB: the gray image under the map in a diverging colour scale (0 = white)."""
    m = np.asarray(cmap_map, dtype=float)
    v = max(float(np.abs(m).max()), 1e-12)
    colours = matplotlib.colormaps["RdBu_r"]((m / v + 1) / 2)[..., :3]
    gray = np.repeat(np.asarray(image, dtype=float)[..., None], 3, axis=-1)
    return (255 * ((1 - alpha) * gray + alpha * colours)).clip(0, 255).astype(np.uint8)


class CEMapLogger(L.Callback):
    """After ``Trainer.test`` of a CEEvaluation: writes figures and logs them.

    Always writes PNGs under ``out_dir/figures`` (maps of a few images per
    finding beside the image with its box; a bar chart per method). With a
    WandbLogger it logs each overlay as a ``wandb.Image`` with the lesion box
    as a W&B box annotation and the scores as a ``wandb.Table``; with a
    TensorBoard logger, the figures as images; every logger gets the scalar
    results.
    """

    def __init__(self, out_dir: str | Path, max_rows_per_figure: int = 6):
        self.out_dir = Path(out_dir)
        self.max_rows = max_rows_per_figure
        self.figures: dict[str, Path] = {}

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        examples: list[dict[str, Any]] = getattr(pl_module, "examples", [])
        results: dict[str, Any] = getattr(pl_module, "results", {})
        self.figures = {}
        methods = list(examples[0]["maps"]) if examples else []
        fig_dir = self.out_dir / "figures"
        for start in range(0, len(examples), self.max_rows):
            chunk = examples[start : start + self.max_rows]
            name = f"maps_{start // self.max_rows:02d}.png"
            findings = ", ".join(dict.fromkeys(ex["finding"] for ex in chunk))
            self.figures[f"CE maps and CAMs: {findings}"] = plot_examples(chunk, methods, fig_dir / name)
        scores = plot_method_scores(results, fig_dir / "method_scores.png")
        if scores is not None:
            self.figures["Scores per method"] = scores
        artefacts = getattr(pl_module, "attack_artefacts", None)
        if artefacts:  # attack!=none: clean vs adversarial maps, statistics, ROC curves
            from causal_ie.attacks.figures import write_attack_figures

            self.figures.update(write_attack_figures(self.out_dir, artefacts))
        for logger in trainer.loggers:
            self._log(logger, examples, results)

    def _log(self, logger, examples, results) -> None:
        scalars = {
            f"eval/{k}": float(v)
            for k, v in flatten(results).items()
            if isinstance(v, int | float) and not (isinstance(v, float) and math.isnan(v))
        }
        logger.log_metrics(scalars)
        kind = type(logger).__name__
        if kind == "WandbLogger":
            self._log_wandb(logger, examples, results)
        elif kind == "TensorBoardLogger":
            from PIL import Image

            for caption, path in self.figures.items():
                img = np.asarray(Image.open(path).convert("RGB"))
                logger.experiment.add_image(caption, img, dataformats="HWC")

    def _log_wandb(self, logger, examples, results) -> None:
        import wandb

        images = []
        for ex in examples:
            k = ex["finding"]
            x, y, w, h = ex["box"]
            box = {
                "position": {"minX": x, "maxX": x + w, "minY": y, "maxY": y + h},
                "domain": "pixel",
                "class_id": 0,
                "box_caption": k,
            }
            for method, m in ex["maps"].items():
                images.append(
                    wandb.Image(
                        heatmap_overlay(ex["image"], m),
                        caption=f"{ex['id']} {k} {method} p={ex['prob']:.2f}",
                        boxes={"lesion": {"box_data": [box], "class_labels": {0: k}}},
                    )
                )
        if images:
            logger.experiment.log({"eval/maps": images})
        # the attack study's figures as they are in report.md
        attack_figures = {c: p for c, p in self.figures.items() if Path(p).name.startswith(("adversarial_", "detection_"))}
        if attack_figures:
            logger.experiment.log({"eval/attack": [wandb.Image(str(p), caption=c) for c, p in attack_figures.items()]})
        loc, faith = results.get("localisation", {}), results.get("faithfulness", {})
        methods = list(dict.fromkeys([*loc, *faith]))
        if methods:
            cols = sorted({c for m in methods for c in {**loc.get(m, {}), **faith.get(m, {})}})
            rows = [[m] + [{**loc.get(m, {}), **faith.get(m, {})}.get(c) for c in cols] for m in methods]
            logger.log_table("eval/scores", columns=["method", *cols], data=rows)
