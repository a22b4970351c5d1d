"""`evaluate(cfg)`: CE maps and CAMs of a trained classifier, scored on the test boxes."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from causal_ie.attacks.evaluation import AttackEvaluation
from causal_ie.attacks.report import AttackReport
from causal_ie.explain.cam import CAMExplainer
from causal_ie.explain.explainers import Explainer, LatentCE
from causal_ie.explain.report import LocalisationReport
from causal_ie.lightning.callbacks import CEMapLogger
from causal_ie.lightning.evaluation import CEEvaluation
from causal_ie.outputs.report import write_report
from causal_ie.outputs.results import write_results
from causal_ie.runs import check_compatible, classifier_identity, instantiate_dict, load_classifier

log = logging.getLogger(__name__)


def build_explainers(cfg: DictConfig) -> dict[str, Explainer]:
    """``ce`` from the ``mask`` group, ``ce_latent`` from ``latent`` (null: off), and one per CAM."""
    explainers: dict[str, Explainer] = {}
    if cfg.get("mask"):
        explainers["ce"] = instantiate(cfg.mask, _convert_="all")
    if cfg.get("latent") and getattr(explainers.get("ce"), "kind", None) != "latent":
        explainers["ce_latent"] = instantiate(cfg.latent, _convert_="all")
    for method in cfg.get("cams") or []:
        explainers[method] = CAMExplainer(method, target_layer=cfg.get("cam_layer") or "auto")
    return explainers


def fit_autoencoders(
    explainers: dict[str, Explainer], classifier: nn.Module, datamodule: L.LightningDataModule, weights: Path | None,
    cache_dir: str | Path, data_cfg: Any = None,
) -> dict[str, dict[str, Any]]:
    """Latent explainers with ``space=autoencoder`` train (or load the cached) autoencoder of
    this classifier on the training images. The cache key names the weights file's
    version and the data settings that choose the training images (seed, augmentation,
    synthetic sizes, ...). Returns each fitted explainer's reconstruction quality."""
    data = OmegaConf.to_container(data_cfg, resolve=True) if isinstance(data_cfg, DictConfig) else data_cfg
    if isinstance(data, dict):  # settings that do not change the training images stay out of the key
        data = {k: v for k, v in data.items() if k not in ("num_workers", "pin_memory", "test_subset", "test_boxes_only")}
    key = f"{classifier_identity(classifier, weights)}|data={json.dumps(data, sort_keys=True, default=str)}"

    def train_images() -> Iterator[Tensor]:
        datamodule.setup("fit")
        return (batch["image"] for batch in datamodule.train_dataloader())

    fits = {}
    for name, explainer in explainers.items():
        if isinstance(explainer, LatentCE) and explainer.space == "autoencoder":
            ae = explainer.fit_autoencoder(classifier, train_images, cache_dir=cache_dir, key=key).autoencoder
            fits[name] = {
                "space": "autoencoder",
                "reconstruction_l1": float(ae.reconstruction_l1),
                "activation_l1": float(ae.activation_l1),
            }
    return fits


def build_attack_evaluation(cfg: DictConfig, classifier: nn.Module, explainers: dict[str, Explainer]) -> AttackEvaluation | None:
    """The attack study from ``attack`` and ``detection`` (None for ``attack=none``)."""
    if not cfg.get("attack"):
        return None
    attack = instantiate(cfg.attack, _convert_="all")
    ce = {name: e for name, e in explainers.items() if name in ("ce", "ce_latent")}
    missing = tuple(getattr(classifier, "missing_findings", ()))
    return AttackEvaluation(
        attack, classifier.findings, ce, seed=int(cfg.seed), missing_findings=missing, **cfg.get("detection", {})
    )


def evaluate(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the classifier, run CEEvaluation over the test split, write results.json + report.md."""
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    classifier, ckpt = load_classifier(cfg)
    datamodule = instantiate(cfg.data, _convert_="all")
    check_compatible(classifier, datamodule, ckpt)
    explainers = build_explainers(cfg)
    autoencoders = fit_autoencoders(explainers, classifier, datamodule, ckpt, cfg.paths.cache_dir, cfg.data)
    settings = instantiate(cfg.evaluation, _convert_="all")  # builds evaluation.deletion (an InterventionSpec)
    module = CEEvaluation(classifier, explainers, attack=build_attack_evaluation(cfg, classifier, explainers), **settings)
    sections = [LocalisationReport(), AttackReport()]
    figures = CEMapLogger(out_dir, sections)
    loggers = instantiate_dict(cfg.get("logger"))
    trainer: L.Trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=[figures, *instantiate_dict(cfg.get("callbacks"))]
    )
    trainer.test(module, datamodule=datamodule)
    # every rank holds the synced results (so sweepers get the metric); rank 0 writes them
    results: dict[str, Any] = {
        "run": {
            "checkpoint": "none" if ckpt is None else str(ckpt),
            "data": datamodule.data_report(),
            "image_size": datamodule.image_size,
            "mask": getattr(explainers.get("ce"), "kind", "none"),
            "backbone": classifier.hparams.backbone,
            "missing_findings": list(getattr(classifier, "missing_findings", ())),
            # what the latent CE intervened through, and how well the autoencoder fits
            **autoencoders,
        },
        **module.results,
    }
    if trainer.is_global_zero:
        write_results(out_dir, results)
        write_report(out_dir, results, sections, figures.figures)
        _print_summary(results, out_dir)
    return results, {"module": module, "trainer": trainer, "datamodule": datamodule, "figures": figures.figures}


def _print_summary(results: dict[str, Any], out_dir: Path) -> None:
    print(f"test mean AUROC: {results['classification']['auroc_mean']:.4f}")
    for method, scores in results.get("localisation", {}).items():
        print(f"pointing game {method:>12}: {scores.get('pointing_game', float('nan')):.3f}")
    if "attack" in results:
        a, d = results["attack"], results["detection"]
        print(f"attack {a['name']} eps={a['eps']}: success rate {a['success_rate']:.3f}, AUROC under attack {a['auroc_mean']:.3f}")
        for name, scores in d.items():
            if isinstance(scores, dict):  # one entry per detector; the rest are settings
                print(f"detection {name:>12}: AUROC {scores['auroc']:.3f}, TPR@5%FPR {scores['tpr@5fpr']:.3f}")
    print(f"results: {out_dir / 'results.json'}\nreport:  {out_dir / 'report.md'}")
