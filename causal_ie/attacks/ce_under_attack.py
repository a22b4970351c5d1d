"""CE under attack: how the attacked (or most likely) finding's CE map changes, clean vs adversarial."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score
from torch import Tensor

from causal_ie.attacks.records import AttackRecords, Column
from causal_ie.attacks.statistics import STATISTICS, box_share, map_correlation, map_statistics

__all__ = ["ce_under_attack", "map_columns"]


def map_columns(
    explainer: str, clean: Tensor, adv: Tensor, boxes: Tensor, top_fraction: float
) -> dict[Column, Tensor]:
    """Record columns of the focus finding's maps [B, H, W], clean vs adversarial: the map
    statistics, the share in the finding's box, and the correlation with the clean map."""
    columns: dict[Column, Tensor] = {}
    for side, maps in (("clean", clean), ("adv", adv)):
        for stat, value in map_statistics(maps, top_fraction).items():
            columns[("stat", explainer, stat, side)] = value
        columns[("stat", explainer, "box_share", side)] = box_share(maps, boxes)
    columns[("stat", explainer, "correlation_with_clean", "adv")] = map_correlation(clean, adv)
    return columns


def ce_under_attack(records: AttackRecords, explainers: Iterable[str]) -> dict[str, Any]:
    """The ``ce_under_attack`` section of results.json: per explainer and statistic both means
    and how well the statistic alone separates adversarial from clean maps."""
    out: dict[str, Any] = {}
    for name in explainers:
        out[name] = {
            stat: shift(records.stat(name, stat, "clean"), records.stat(name, stat, "adv"))
            for stat in (*STATISTICS, "box_share")
        }
        out[name]["correlation_with_clean"] = {"adv_mean": nanmean(records.stat(name, "correlation_with_clean", "adv"))}
    # the control: how well the focus finding's logit alone separates (the statistics above
    # know which finding was attacked, and CE partly re-encodes its confidence)
    out["classifier"] = {"focus_logit": shift(records.stat("classifier", "focus_logit", "clean"),
                                              records.stat("classifier", "focus_logit", "adv"))}
    return out


def shift(clean: np.ndarray, adv: np.ndarray) -> dict[str, float]:
    """A statistic clean vs adversarial: both means, and how well it alone separates them."""
    return {"clean_mean": nanmean(clean), "adv_mean": nanmean(adv), "separation_auroc": _separation(clean, adv)}


def nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=float)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def _separation(clean: np.ndarray, adv: np.ndarray) -> float:
    keep_c, keep_a = clean[np.isfinite(clean)], adv[np.isfinite(adv)]
    if len(keep_c) == 0 or len(keep_a) == 0:
        return float("nan")
    y = np.r_[np.zeros(len(keep_c)), np.ones(len(keep_a))]
    return float(roc_auc_score(y, np.r_[keep_c, keep_a]))
