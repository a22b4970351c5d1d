"""CEMapLogger: a run's figures as PNGs, and to W&B / TensorBoard when those log."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np

from causal_ie.outputs.plots import overlay_rgb
from causal_ie.outputs.report import Figures, ReportSection, write_artefacts
from causal_ie.outputs.results import flatten

log = logging.getLogger(__name__)


class CEMapLogger(L.Callback):
    """After ``Trainer.test`` of a :class:`~causal_ie.lightning.evaluation.CEEvaluation`: every
    section writes its artefacts (PNGs under ``out_dir/figures``, data files) from the module's
    ``results`` and ``artefacts``; then each logger gets the scalar results. With a WandbLogger
    the example maps go to W&B as ``wandb.Image`` with the lesion box as a W&B box annotation,
    the other figures as images and the scores as a ``wandb.Table``; with TensorBoard, the
    figures as images.

    ``figures`` holds, after the test, ``{section name: {caption: path}}`` for report.md.
    """

    def __init__(self, out_dir: str | Path, sections: Sequence[ReportSection]):
        self.out_dir = Path(out_dir)
        self.sections = list(sections)
        self.figures: dict[str, Figures] = {}

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        results: dict[str, Any] = getattr(pl_module, "results", {})
        artefacts: dict[str, Any] = getattr(pl_module, "artefacts", {})
        self.figures = write_artefacts(self.out_dir, self.sections, results, artefacts)
        examples = artefacts.get("localisation", {}).get("examples", [])
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

            for section in self.figures.values():
                for caption, path in section.items():
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
                        overlay_rgb(ex["image"], m),
                        caption=f"{ex['id']} {k} {method} p={ex['prob']:.2f}",
                        boxes={"lesion": {"box_data": [box], "class_labels": {0: k}}},
                    )
                )
        if images:
            logger.experiment.log({"eval/maps": images})
        # the other sections' figures as they are in report.md (the attack study's, ...)
        for name, figures in self.figures.items():
            if name != "localisation" and figures:
                logger.experiment.log({f"eval/{name}": [wandb.Image(str(p), caption=c) for c, p in figures.items()]})
        loc, faith = results.get("localisation", {}), results.get("faithfulness", {})
        methods = list(dict.fromkeys([*loc, *faith]))
        if methods:
            # one number per cell: nested entries (a method's differences to the others) stay in results.json
            scores = {m: {c: v for c, v in {**loc.get(m, {}), **faith.get(m, {})}.items() if not isinstance(v, dict)}
                      for m in methods}
            cols = sorted({c for m in methods for c in scores[m]})
            rows = [[m] + [scores[m].get(c) for c in cols] for m in methods]
            logger.log_table("eval/scores", columns=["method", *cols], data=rows)
