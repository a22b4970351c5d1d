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
from torch import Tensor

from causal_ie.attacks.evaluation import AttackEvaluation
from causal_ie.explain.cam import CAMExplainer
from causal_ie.explain.explainers import Explainer, LatentCE
from causal_ie.lightning.callbacks import CEMapLogger
from causal_ie.lightning.evaluation import CEEvaluation
from causal_ie.models import Classifier
from causal_ie.report import write_report, write_results
from causal_ie.runs import instantiate_dict

log = logging.getLogger(__name__)


def find_checkpoint(ckpt_path: str | None, search_dirs: list[str | Path]) -> Path:
    """``ckpt_path`` if given, else the newest ``checkpoints/best.ckpt`` of a train.py run."""
    if ckpt_path:
        path = Path(ckpt_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={str(ckpt_path)!r} does not exist")
        return path
    found = [p for d in search_dirs if Path(d).is_dir() for p in Path(d).glob("**/checkpoints/best.ckpt")]
    if not found:
        raise FileNotFoundError(
            "no trained classifier found: run `python train.py` first, or pass "
            f"ckpt_path=/path/to/best.ckpt (searched {[str(d) for d in search_dirs]} for checkpoints/best.ckpt)"
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def check_compatible(classifier: Classifier, datamodule: L.LightningDataModule, ckpt: Path) -> None:
    """A checkpoint must predict the data's findings at the data's image size."""
    findings = tuple(datamodule.findings)
    if tuple(classifier.findings) != findings:
        raise ValueError(
            f"checkpoint {ckpt} predicts {len(classifier.findings)} findings "
            f"({', '.join(classifier.findings[:4])}, ...) but the data has {len(findings)} "
            f"({', '.join(findings[:4])}, ...): use a checkpoint trained on this data"
        )
    size = classifier.hparams.get("image_size")
    if size is not None and int(size) != int(datamodule.image_size):
        raise ValueError(
            f"checkpoint {ckpt} was trained at image_size={size} but data.image_size="
            f"{datamodule.image_size}: set data.image_size={size} or use a matching checkpoint"
        )


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
    explainers: dict[str, Explainer], classifier: Classifier, datamodule: L.LightningDataModule, ckpt: Path,
    cache_dir: str | Path, data_cfg: Any = None,
) -> dict[str, dict[str, Any]]:
    """Latent explainers with ``space=autoencoder`` train (or load the cached) autoencoder of
    this checkpoint on the training images. The cache key names the checkpoint file's
    version and the data settings that choose the training images (seed, augmentation,
    synthetic sizes, ...). Returns each fitted explainer's reconstruction quality."""
    stat = ckpt.stat()
    data = OmegaConf.to_container(data_cfg, resolve=True) if isinstance(data_cfg, DictConfig) else data_cfg
    if isinstance(data, dict):  # settings that do not change the training images stay out of the key
        data = {k: v for k, v in data.items() if k not in ("num_workers", "pin_memory", "test_subset", "test_boxes_only")}
    key = f"{ckpt.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|data={json.dumps(data, sort_keys=True, default=str)}"

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


def build_attack_evaluation(cfg: DictConfig, classifier: Classifier, explainers: dict[str, Explainer]) -> AttackEvaluation | None:
    """The attack study from ``attack`` and ``detection`` (None for ``attack=none``)."""
    if not cfg.get("attack"):
        return None
    attack = instantiate(cfg.attack, _convert_="all")
    ce = {name: e for name, e in explainers.items() if name in ("ce", "ce_latent")}
    return AttackEvaluation(attack, classifier.findings, ce, seed=int(cfg.seed), **cfg.get("detection", {}))


def evaluate(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the classifier, run CEEvaluation over the test split, write results.json + report.md."""
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    ckpt = find_checkpoint(cfg.get("ckpt_path"), list(cfg.paths.checkpoint_search))
    classifier = Classifier.load(ckpt)
    datamodule = instantiate(cfg.data, _convert_="all")
    check_compatible(classifier, datamodule, ckpt)
    explainers = build_explainers(cfg)
    autoencoders = fit_autoencoders(explainers, classifier, datamodule, ckpt, cfg.paths.cache_dir, cfg.data)
    module = CEEvaluation(classifier, explainers, attack=build_attack_evaluation(cfg, classifier, explainers), **cfg.evaluation)
    figures = CEMapLogger(out_dir)
    loggers = instantiate_dict(cfg.get("logger"))
    trainer: L.Trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=[figures, *instantiate_dict(cfg.get("callbacks"))]
    )
    trainer.test(module, datamodule=datamodule)
    # every rank holds the synced results (so sweepers get the metric); rank 0 writes them
    results: dict[str, Any] = {
        "run": {
            "checkpoint": str(ckpt),
            "data": datamodule.source,
            "image_size": datamodule.image_size,
            "mask": getattr(explainers.get("ce"), "kind", "none"),
            "backbone": classifier.hparams.backbone,
            # what the latent CE intervened through, and how well the autoencoder fits
            **{f"{name}.{k}": v for name, fit in autoencoders.items() for k, v in fit.items()},
        },
        **module.results,
    }
    if trainer.is_global_zero:
        write_results(out_dir, results)
        write_report(out_dir, results, figures.figures)
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
