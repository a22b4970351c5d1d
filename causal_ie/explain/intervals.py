"""95 % patient-bootstrap intervals of the evaluation's scores, from per-item rows.

Classification AUROC (per finding and their mean) from per-image probabilities and
labels; the pointing game and IoBB/IoU accuracies of every explainer from per-pair
values; and the difference of each CE explainer to every other method on the same
pairs (paired: both on the same resamples). Images of one patient are resampled
together (:mod:`causal_ie.intervals`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from causal_ie.intervals import bootstrap_ci, bootstrap_difference_ci, mean_ci, weighted_auroc, weighted_mean


def _bounds(prefix: str, interval) -> dict[str, float]:
    return {f"{prefix}_ci_low": interval.low, f"{prefix}_ci_high": interval.high}


def classification_intervals(
    probs: np.ndarray, labels: np.ndarray, groups: Sequence[str], predicted: np.ndarray, findings: Sequence[str],
    n_boot: int, seed: int,
) -> dict[str, Any]:
    """``auroc_mean`` and ``auroc.<finding>`` interval bounds (findings with both classes among
    their known labels; a NaN label is left out of its finding's AUROC, as in the estimate)."""
    known = ~np.isnan(labels)
    usable = [k for k in range(len(findings)) if predicted[k] and 0 < np.nansum(labels[:, k]) < known[:, k].sum()]
    out: dict[str, Any] = {"auroc": {}}
    if not usable:
        return out

    def known_auroc(y: np.ndarray, p: np.ndarray, weights: np.ndarray) -> np.ndarray:
        rows = ~np.isnan(y)
        return weighted_auroc(y[rows], p[rows], weights[:, rows])

    def mean_auroc(*columns: np.ndarray, weights: np.ndarray) -> np.ndarray:
        values = np.stack([known_auroc(columns[2 * i], columns[2 * i + 1], weights) for i in range(len(usable))])
        with warnings.catch_warnings():  # a resample with no finding of both classes: NaN, dropped
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(values, axis=0)

    columns = [a for k in usable for a in (labels[:, k], probs[:, k])]
    out.update(_bounds("auroc_mean", bootstrap_ci(mean_auroc, groups, *columns, n_boot=n_boot, seed=seed)))
    for k in usable:
        interval = bootstrap_ci(known_auroc, groups, labels[:, k], probs[:, k], n_boot=n_boot, seed=seed)
        out["auroc"].update(_bounds(findings[k], interval))
    return out


def localisation_intervals(
    pairs: Mapping[str, Mapping[str, np.ndarray]], groups: Sequence[str], thresholds: Sequence[float],
    n_boot: int, seed: int, compared: Sequence[float] = (0.5,),
) -> dict[str, dict[str, Any]]:
    """Per method: interval bounds of ``pointing_game``, ``iobb@T`` and ``iou@T``, and for every
    CE method (name starting with ``ce``) ``minus.<other>`` = the difference of its pointing game
    and IoBB@T (``compared``) to each other method, with the interval of that difference.

    ``pairs[method]`` holds per-pair arrays ``hit``, ``iou`` and ``iobb``."""
    out: dict[str, dict[str, Any]] = {}
    scores = {
        method: {
            "pointing_game": v["hit"],
            **{f"iobb@{t:g}": (v["iobb"] > t).astype(float) for t in thresholds},
            **{f"iou@{t:g}": (v["iou"] > t).astype(float) for t in thresholds},
        }
        for method, v in pairs.items()
    }
    for method, values in scores.items():
        out[method] = {}
        for name, per_pair in values.items():
            out[method].update(_bounds(name, mean_ci(per_pair, groups, n_boot=n_boot, seed=seed)))
    for method in (m for m in scores if m.startswith("ce")):
        minus: dict[str, dict[str, float]] = {}
        for other in (m for m in scores if m != method):
            for name in ("pointing_game", *(f"iobb@{t:g}" for t in compared)):
                diff = bootstrap_difference_ci(
                    _first_mean, _second_mean, groups, scores[method][name], scores[other][name],
                    n_boot=n_boot, seed=seed,
                )
                minus.setdefault(other, {})[name] = diff.estimate
                minus[other].update(_bounds(name, diff))
        out[method]["minus"] = minus
    return out


def _first_mean(a: np.ndarray, b: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return weighted_mean(a, weights)


def _second_mean(a: np.ndarray, b: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return weighted_mean(b, weights)
