"""`train(cfg)`: build data, model, callbacks, loggers and trainer from the config; fit; test."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from causal_ie.io import atomic_write_json
from causal_ie.runs import TRAINABLE, build_callbacks, instantiate_dict

log = logging.getLogger(__name__)


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Train (``cfg.train``), then test the best checkpoint (``cfg.test``).

    Returns ``(metrics, objects)``: metrics by name (``val/auroc_mean`` is the
    best validation score; ``test/...`` from the best checkpoint) and the built
    objects (``datamodule``, ``model``, ``trainer``), so tests can inspect them.
    """
    L.seed_everything(cfg.seed, workers=True)
    datamodule: L.LightningDataModule = instantiate(cfg.data, _convert_="all")
    overrides: dict[str, Any] = {}
    if cfg.model.get("_target_") == TRAINABLE:  # a pretrained model (model=xrv) is refused below
        overrides["labels"] = datamodule.labels  # the model predicts the data's labels; its checkpoint keeps them
        if cfg.get("auto_pos_weight"):
            overrides["pos_weight"] = datamodule.positive_weights()
    model: L.LightningModule = instantiate(cfg.model, _convert_="all", **overrides)
    if not isinstance(model, L.LightningModule):
        raise ValueError(
            f"model= builds a {type(model).__name__}, a pretrained classifier that causal-ie explains as it is: "
            "use it with evaluate.py (e.g. python evaluate.py model=xrv) or causal_ie.counterfactuals; "
            "train.py trains the timm backbones (model=densenet121, resnet18, ...)"
        )
    callbacks = build_callbacks(cfg)
    loggers = instantiate_dict(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    metrics: dict[str, float] = {}
    if cfg.get("train", True):
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
        metrics.update({k: _scalar(v) for k, v in trainer.callback_metrics.items()})
        ckpt_cb = trainer.checkpoint_callback
        if ckpt_cb is not None and ckpt_cb.best_model_score is not None:
            metrics[ckpt_cb.monitor] = float(ckpt_cb.best_model_score)
    if cfg.get("test", True):
        ckpt = _best_checkpoint(trainer) if cfg.get("train", True) else cfg.get("ckpt_path")
        if ckpt is None:
            log.warning("no best checkpoint to test; testing the current weights")
        trainer.test(model, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
        metrics.update({k: _scalar(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})

    if trainer.is_global_zero:
        best = _best_checkpoint(trainer)
        summary = {"metrics": metrics, "best_checkpoint": best}
        atomic_write_json(Path(cfg.paths.output_dir) / "train_metrics.json", summary)
        _print_summary(metrics, best)
    return metrics, {"datamodule": datamodule, "model": model, "trainer": trainer}


def _best_checkpoint(trainer: L.Trainer) -> str | None:
    cb = trainer.checkpoint_callback
    return (cb.best_model_path or None) if cb is not None else None


def _print_summary(metrics: dict[str, float], best: str | None) -> None:
    val = metrics.get("val/auroc_mean")
    test = metrics.get("test/auroc_mean")
    if val is not None:
        print(f"validation mean AUROC (best epoch): {val:.4f}")
    if test is not None:
        print(f"test mean AUROC: {test:.4f}")
    if best:
        print(f"best checkpoint: {best}")
