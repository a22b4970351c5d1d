"""Hydra run plumbing shared by train.py and evaluate.py."""

from __future__ import annotations

import logging
import math
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig

from causal_ie.io import atomic_write_text

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


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_task(task: Callable[[DictConfig], tuple[dict, dict]], cfg: DictConfig) -> float | None:
    """Run ``task`` and return ``cfg.optimized_metric`` for Hydra sweepers.

    In a multirun, a failing point writes ``error.txt`` in its run directory and
    returns NaN instead of killing the rest of the sweep; a single run raises.
    """
    try:
        metrics, _ = task(cfg)
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
    from causal_ie.report import flatten  # nested results -> dotted names

    metrics = flatten(metrics)
    if name not in metrics:
        raise KeyError(f"optimized_metric={name!r} is not among the metrics: {sorted(metrics)}")
    return float(metrics[name])


class SummarizeSweep(Callback):
    """Hydra callback: after a multirun of evaluate.py, write its summary table and plots
    (``python -m causal_ie.report summarize <sweep dir>``), so a sweep is one command."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from causal_ie.report import summarize

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            outputs = summarize(sweep_dir)
        except Exception as err:  # noqa: BLE001 - the sweep's runs are done and saved; a summary is extra
            log.warning("no sweep summary for %s: %s", sweep_dir, err)
            return
        log.info("sweep summary: %s", outputs["md"])
