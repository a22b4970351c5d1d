"""The ``python -m causal_ie.explain`` task: a classifier's explanations of image files
(:mod:`causal_ie.explain.files` does the work; this composes it from the config)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from causal_ie.explain.factory import build_explainers
from causal_ie.explain.files import EXPLANATIONS_FILE, FileExplainer, explain_files, input_files, input_size
from causal_ie.runs import load_classifier

log = logging.getLogger(__name__)


def run_explain(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``python -m causal_ie.explain`` task: the model of ``ckpt_path`` / ``model=``, the
    ``mask`` CE and the first of ``cams`` on the files of ``input``."""
    if cfg.get("input") in (None, "", "???"):
        raise ValueError("input= is required: an image file (PNG, JPEG, DICOM) or a folder of them")
    files = input_files(cfg.input)
    classifier, ckpt = load_classifier(cfg)
    if torch.cuda.is_available() and cfg.get("device", "auto") in ("auto", "cuda"):
        classifier = classifier.cuda()
    if not cfg.get("mask"):
        raise ValueError("mask= is required: the CE explainer (patch, pixel, superpixel, latent)")
    explainers = build_explainers(cfg)  # as evaluate.py builds them: `ce` from mask, then one per CAM
    ce = explainers.pop("ce")
    cams = list(explainers)
    cam = explainers[cams[0]] if cams else None
    explainer = FileExplainer(classifier, ce, cam, input_size(classifier, cfg.get("image_size")),
                              int(cfg.top_labels), float(cfg.region_threshold), bool(cfg.voi_lut))
    log.info("%d file(s) from %s; %s at %d px, %d labels", len(files), cfg.input, classifier.hparams.backbone,
             explainer.image_size, len(explainer.labels))
    run = {"input": str(cfg.input), "checkpoint": "none" if ckpt is None else str(ckpt),
           "backbone": classifier.hparams.backbone, "mask": getattr(ce, "kind", "ce"), "cam": cams[0] if cams else "none"}
    out_dir = Path(cfg.paths.output_dir)
    results = explain_files(explainer, files, out_dir, str(cfg.on_error), run)
    print(f"explained {results['run']['explained']} of {len(files)} file(s): {out_dir / EXPLANATIONS_FILE}")
    return results, {"explainer": explainer}
