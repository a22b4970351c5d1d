"""Run plumbing shared by the entry points: building config groups, finding and checking the
classifier to explain, and running a task so one failing sweep point does not end the sweep."""

from __future__ import annotations

import logging
import math
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from causal_ie.io import atomic_write_text
from causal_ie.labels import LabelAlignment, model_labels
from causal_ie.models import Classifier

TRAINABLE = "causal_ie.models.Classifier"  # the _target_ of conf/model/_classifier.yaml
from causal_ie.outputs.results import flatten
from causal_ie.stopping import EvaluationStopped

log = logging.getLogger(__name__)


def instantiate_dict(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a config group such as ``callbacks`` or ``logger``."""
    if not cfg:
        return []
    objects = []
    for key, entry in cfg.items():
        if isinstance(entry, DictConfig) and "_target_" in entry:
            objects.append(instantiate(entry))
        elif entry is not None:
            raise ValueError(f"config entry {key!r} has no _target_: {entry}")
    return objects


def build_callbacks(cfg: DictConfig) -> list[Any]:
    """The ``callbacks`` group; a progress bar is left out when ``trainer.enable_progress_bar``
    is false (Lightning refuses the pair rather than choosing)."""
    from lightning.pytorch.callbacks import ProgressBar

    callbacks = instantiate_dict(cfg.get("callbacks"))
    if cfg.get("trainer") is not None and cfg.trainer.get("enable_progress_bar", True) is False:
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return callbacks


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_task(task: Callable[[DictConfig], tuple[dict, dict]], cfg: DictConfig) -> float | None:
    """Run ``task`` and return ``cfg.optimized_metric`` for Hydra sweepers.

    In a multirun, a failing point writes ``error.txt`` in its run directory and
    returns NaN instead of killing the rest of the sweep; a single run raises.
    """
    try:
        metrics, _ = task(cfg)
    except EvaluationStopped as stopped:  # saved: exit non-zero so schedulers and sweeps see it unfinished
        log.warning("%s", stopped)
        raise SystemExit(stopped.exit_code) from None
    except Exception:
        if not _in_multirun():
            raise
        out = Path(HydraConfig.get().runtime.output_dir)
        atomic_write_text(out / "error.txt", traceback.format_exc())
        log.exception("this sweep point failed (see %s); the sweep goes on", out / "error.txt")
        return math.nan
    name = cfg.get("optimized_metric")
    if not name:
        return None
    metrics = flatten(metrics)
    if name not in metrics:
        raise KeyError(f"optimized_metric={name!r} is not among the metrics: {sorted(metrics)}")
    return float(metrics[name])


def find_checkpoint(ckpt_path: str | None, search_dirs: list[str | Path]) -> Path:
    """``ckpt_path`` if given, else the newest ``checkpoints/best.ckpt`` of a train.py run."""
    if ckpt_path:
        path = Path(ckpt_path).expanduser()
        if path.is_dir():
            inside = sorted(str(p.relative_to(path)) for p in path.glob("**/*.ckpt"))[:6]
            hint = (f"; it holds {', '.join(inside)}: pass one of them, e.g. ckpt_path={str(path / inside[0])!r}"
                    if inside else "; it holds no .ckpt file")
            raise FileNotFoundError(f"ckpt_path={str(ckpt_path)!r} is a directory, not a checkpoint file{hint}")
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


def check_compatible(classifier: nn.Module, datamodule: L.LightningDataModule, ckpt: Path | None) -> LabelAlignment:
    """A classifier must share labels with the data and run at the data's image size (a model
    that resizes its input itself, such as ``model=xrv``, has no image size). From then on the
    datamodule serves its labels in the classifier's label space; returns that alignment."""
    what = f"checkpoint {ckpt}" if ckpt is not None else f"model {classifier.hparams.backbone}"
    try:
        alignment = datamodule.align_labels(model_labels(classifier))
    except ValueError as err:
        raise ValueError(f"{what}: {err}: use a model trained on labels of this data") from None
    size = classifier.hparams.get("image_size")
    if size is not None and int(size) != int(datamodule.image_size):
        raise ValueError(
            f"{what} was trained at image_size={size} but data.image_size="
            f"{datamodule.image_size}: set data.image_size={size} or use a matching checkpoint"
        )
    return alignment


def load_classifier(cfg: DictConfig) -> tuple[nn.Module, Path | None]:
    """The classifier a run explains, in eval mode, and the file its weights came from.

    ``cfg.model`` a pretrained model (``model=xrv``): that model, built from its config (its
    ``weights_file``; None for random weights). Otherwise (no model, or the settings of a
    classifier to train, as experiments set them) ``cfg.ckpt_path``, else the newest train.py
    checkpoint under ``cfg.paths.checkpoint_search``.
    """
    model_cfg = cfg.get("model")
    # a classifier to train (an experiment's model=resnet18, model.backbone=...) describes how the
    # checkpoint was trained; only a pretrained model config (model=xrv) is the model itself
    if model_cfg and model_cfg.get("_target_") and model_cfg.get("_target_") != TRAINABLE:
        classifier = instantiate(model_cfg, _convert_="all").eval()
        weights = getattr(classifier, "weights_file", None)
        return classifier, None if weights is None else Path(weights)
    ckpt = find_checkpoint(cfg.get("ckpt_path"), list(cfg.paths.checkpoint_search))
    return Classifier.load(ckpt), ckpt


def classifier_identity(classifier: nn.Module, weights: Path | None) -> str:
    """A key that changes when the classifier's weights do (for caches of derived models):
    the weights file's path, size and mtime, or the backbone's name for random weights."""
    if weights is None:
        return str(classifier.hparams.backbone)
    stat = weights.stat()
    return f"{weights.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
