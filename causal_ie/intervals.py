"""Confidence intervals for detection and explanation metrics (AUROC, TPR at a fixed FPR, means, rates).

Three methods:

* **Patient (cluster) bootstrap**, the project's default: resample whole
  patients with replacement, recompute the statistic, take the percentile
  interval (Efron & Tibshirani 1993, ch. 13; clusters: Field & Welsh 2007).
  Images of one patient are correlated (and a clean/adversarial pair shares
  its patient), so the patient, not the image, is the independent unit.
* **DeLong** et al. 1988 (Biometrics 44:837), with the O(n log n) midrank
  algorithm of Sun & Xu 2014 (IEEE SPL 21:1389): closed-form variance of an
  AUROC and of a paired AUROC difference. Assumes independent images, so it
  can be too narrow when patients contribute several images; a fast check.
* **Wilson** 1927 score interval for a plain proportion (e.g. an attack's
  success rate over independent images).

Every interval is an :class:`Interval`; it unpacks as ``estimate, low, high``.

The bootstrap is vectorised through *weights*: resample ``b`` gives image
``i`` the weight ``w[b, i]`` = how many times its patient was drawn, and a
statistic is computed for all resamples at once from the ``[B, n]`` weight
matrix (:func:`weighted_auroc`, :func:`weighted_tpr_at_fpr`,
:func:`weighted_mean`). With integer weights this equals computing the
statistic on the resampled (duplicated) images. Any statistic with the
signature ``statistic(*arrays, weights=W) -> [B]`` works with
:func:`bootstrap_ci` / :func:`bootstrap_difference_ci`, e.g. a TPR difference::

    tpr = functools.partial(weighted_tpr_at_fpr, fpr=0.05)
    bootstrap_difference_ci(
        lambda y, a, b, weights: tpr(y, a, weights=weights),
        lambda y, a, b, weights: tpr(y, b, weights=weights),
        groups, labels, scores_a, scores_b,
    )

Degenerate cases: a statistic that is undefined in a resample (an AUROC of a
resample holding one class only) is NaN there; those resamples are dropped
and counted in :attr:`Interval.n_dropped`. A zero-variance DeLong estimate
(e.g. perfect separation, AUROC 1) and a bootstrap whose resamples all agree
give the zero-width interval ``(estimate, estimate, estimate)``: the sample
holds no evidence of spread, which is not certainty (report ``n`` too).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np
from scipy.special import expit, logit
from scipy.stats import norm, rankdata

__all__ = [
    "Interval",
    "auroc_bootstrap_ci",
    "auroc_ci",
    "auroc_difference_bootstrap_ci",
    "auroc_difference_ci",
    "bootstrap_ci",
    "bootstrap_difference_ci",
    "delong_auroc",
    "mean_ci",
    "tpr_at_fpr_ci",
    "weighted_auroc",
    "weighted_mean",
    "weighted_tpr_at_fpr",
    "wilson_ci",
]

# Largest weight matrix (entries) built at once; larger bootstraps go in chunks (~16 MB of float64).
_CHUNK_ENTRIES = 2**21


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided confidence interval; unpacks as ``estimate, low, high``.

    ``method``: ``"bootstrap-percentile"``, ``"delong-logit"`` (AUROC),
    ``"delong"`` (AUROC difference) or ``"wilson"``. ``n_resamples`` and
    ``n_dropped`` (resamples where the statistic was undefined) are 0 for the
    closed-form methods. ``low``/``high`` are NaN only when every resample was dropped.
    """

    estimate: float
    low: float
    high: float
    level: float
    method: str
    n_resamples: int = 0
    n_dropped: int = 0

    def __iter__(self) -> Iterator[float]:
        yield from (self.estimate, self.low, self.high)

    def as_dict(self) -> dict[str, Any]:
        """All fields as plain Python values (for results.json)."""
        return asdict(self)


# ----------------------------------------------------------------------------- input checks


def _level(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95; got {level!r}")
    return float(level)


def _z(level: float) -> float:
    return float(norm.ppf(0.5 + _level(level) / 2))


def _labels(labels: Any) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array of 0/1 (1 = adversarial), got shape {y.shape}")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError(f"labels must be 0/1 or bool, got values {np.unique(y)[:5].tolist()}")
        y = y.astype(bool)
    return y


def _values(values: Any, n: int, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.shape != (n,):
        raise ValueError(f"{name} must be 1-D with one value per row ({n}), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} must be finite, got {int((~np.isfinite(x)).sum())} NaN/inf value(s)")
    return x


def _weights(weights: Any, n: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim == 1:
        w = w[None]
    if w.ndim != 2 or w.shape[1] != n:
        raise ValueError(f"weights must be [B, {n}] (one row per resample), got shape {np.shape(weights)}")
    if (w < 0).any() or not np.isfinite(w).all():
        raise ValueError("weights must be finite and >= 0")
    return w


def _both_classes(y: np.ndarray, minimum: int, why: str) -> tuple[int, int]:
    m, n = int(y.sum()), int((~y).sum())
    if m < minimum or n < minimum:
        raise ValueError(
            f"labels must hold at least {minimum} positive(s) and {minimum} negative(s) {why}; got {m} and {n}"
        )
    return m, n


# ----------------------------------------------------------------------------- DeLong


def _delong_components(y: np.ndarray, s: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUROC and DeLong's structural components ``V10 [m]`` (positives), ``V01 [n]`` (negatives).

    ``V10_i`` = share of negatives scored below positive ``i`` (ties count 1/2),
    ``V01_j`` = share of positives scored above negative ``j``; from midranks
    (Sun & Xu 2014): ``V10 = (Tz - Tx) / n``, ``V01 = 1 - (Tz - Ty) / m``, with ``Tz`` the midranks
    in all scores, ``Tx``/``Ty`` those among the positives/negatives.
    """
    pos, neg = s[y], s[~y]
    m, n = len(pos), len(neg)
    tz = rankdata(np.concatenate([pos, neg]))  # average ranks = midranks
    tx, ty = rankdata(pos), rankdata(neg)
    auc = (tz[:m].sum() - m * (m + 1) / 2) / (m * n)
    return float(auc), (tz[:m] - tx) / n, 1.0 - (tz[m:] - ty) / m


def _delong_variance(v10: np.ndarray, v01: np.ndarray) -> float:
    """``S10 / m + S01 / n`` (DeLong et al. 1988), sample variances with ddof=1."""
    return float(np.var(v10, ddof=1) / len(v10) + np.var(v01, ddof=1) / len(v01))


def delong_auroc(labels: Any, scores: Any) -> tuple[float, float]:
    """``(auroc, variance)`` by DeLong et al. 1988, O(n log n) (Sun & Xu 2014).

    ``labels`` 0/1 (1 = positive, e.g. adversarial), ``scores`` higher = more
    positive; ties count 1/2. Needs at least 2 positives and 2 negatives.
    """
    y = _labels(labels)
    s = _values(scores, len(y), "scores")
    _both_classes(y, 2, "for a DeLong variance")
    auc, v10, v01 = _delong_components(y, s)
    return auc, _delong_variance(v10, v01)


def auroc_ci(labels: Any, scores: Any, level: float = 0.95) -> Interval:
    """AUROC with a DeLong interval on the logit scale: ``expit(logit(A) +- z * se / (A (1 - A)))``.

    The logit transform keeps the interval inside (0, 1) and makes it
    asymmetric near 1 (delta method: ``se(logit A) = se(A) / (A (1 - A))``).
    AUROC 0 or 1, or zero variance, gives ``(A, A, A)`` (see the module docstring).
    Assumes independent images: with several images per patient prefer
    :func:`auroc_bootstrap_ci`.
    """
    z = _z(level)
    auc, var = delong_auroc(labels, scores)
    if var <= 0 or auc <= 0 or auc >= 1:
        return Interval(auc, auc, auc, level, "delong-logit")
    half = z * math.sqrt(var) / (auc * (1 - auc))
    center = float(logit(auc))
    return Interval(auc, float(expit(center - half)), float(expit(center + half)), level, "delong-logit")


def auroc_difference_ci(labels: Any, scores_a: Any, scores_b: Any, level: float = 0.95) -> Interval:
    """Paired DeLong interval of ``AUROC(a) - AUROC(b)``, the same images scored by two detectors.

    Variance of the difference from the differences of the structural
    components (DeLong et al. 1988's contrast ``L S L^T`` with ``L = [1, -1]``),
    normal interval ``diff +- z * se`` clipped to [-1, 1]. Identical score
    vectors give exactly ``(0, 0, 0)``.
    """
    z = _z(level)
    y = _labels(labels)
    a = _values(scores_a, len(y), "scores_a")
    b = _values(scores_b, len(y), "scores_b")
    _both_classes(y, 2, "for a DeLong variance")
    auc_a, v10_a, v01_a = _delong_components(y, a)
    auc_b, v10_b, v01_b = _delong_components(y, b)
    diff = auc_a - auc_b
    half = z * math.sqrt(max(_delong_variance(v10_a - v10_b, v01_a - v01_b), 0.0))
    return Interval(diff, max(diff - half, -1.0), min(diff + half, 1.0), level, "delong")


# ----------------------------------------------------------------------------- Wilson


def wilson_ci(successes: int, n: int, level: float = 0.95) -> Interval:
    """Proportion ``successes / n`` with the Wilson (1927) score interval.

    ``(p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)``; stays in
    [0, 1] and is sensible at 0 and n successes. For independent trials only.
    """
    z = _z(level)
    if int(n) != n or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if int(successes) != successes or not 0 <= successes <= n:
        raise ValueError(f"successes must be an integer in [0, n={n}], got {successes!r}")
    p, z2 = successes / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return Interval(p, max(center - half, 0.0), min(center + half, 1.0), level, "wilson")


# ----------------------------------------------------------------------------- weighted statistics


def _tie_blocks(s: np.ndarray, descending: bool) -> tuple[np.ndarray, np.ndarray]:
    """Sort order of ``s`` and the start index of each run of tied scores in that order."""
    order = np.argsort(-s if descending else s, kind="stable")
    sorted_s = s[order]
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    return order, starts


def _class_weights(y: np.ndarray, s: np.ndarray, w: np.ndarray, descending: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per resample and distinct score (sorted): total weight of positives, of negatives; ``[B, U]`` each."""
    order, starts = _tie_blocks(s, descending)
    w, y = w[:, order], y[order]
    return np.add.reduceat(w * y, starts, axis=1), np.add.reduceat(w * ~y, starts, axis=1)


def weighted_auroc(labels: Any, scores: Any, weights: Any) -> np.ndarray:
    """AUROC of each weight row, ``[B]`` (NaN where a row leaves one class without weight).

    Image ``i`` counts ``w[b, i]`` times: ``sum_{pos i, neg j} w_i w_j
    (1[s_i > s_j] + 1/2 1[s_i = s_j]) / (W_pos W_neg)``, from one sort (O(B n)
    after it). With all weights 1 this is ``sklearn.metrics.roc_auc_score``.
    """
    y = _labels(labels)
    s = _values(scores, len(y), "scores")
    w = _weights(weights, len(y))
    pos, neg = _class_weights(y, s, w, descending=False)
    neg_below = np.cumsum(neg, axis=1) - neg
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (pos * (neg_below + 0.5 * neg)).sum(axis=1) / (pos.sum(axis=1) * neg.sum(axis=1))
    out[(pos.sum(axis=1) == 0) | (neg.sum(axis=1) == 0)] = np.nan
    return out


def weighted_tpr_at_fpr(labels: Any, scores: Any, weights: Any, fpr: float = 0.05) -> np.ndarray:
    """Highest TPR among ROC points with FPR <= ``fpr``, per weight row ``[B]`` (NaN: one class only).

    The ROC points are the thresholds "score >= t" at every distinct score plus
    (0, 0), as :func:`causal_ie.attacks.detection.tpr_at_fpr` (which it equals
    for unit weights).
    """
    if not 0 <= fpr <= 1:
        raise ValueError(f"fpr must be in [0, 1], got {fpr!r}")
    y = _labels(labels)
    s = _values(scores, len(y), "scores")
    w = _weights(weights, len(y))
    pos, neg = _class_weights(y, s, w, descending=True)
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr, fpr_ = tp / tp[:, -1:], fp / fp[:, -1:]
    out = np.where(fpr_ <= fpr, tpr, 0.0).max(axis=1)
    out[(tp[:, -1] == 0) | (fp[:, -1] == 0)] = np.nan
    return out


def weighted_mean(values: Any, weights: Any) -> np.ndarray:
    """Weighted mean of ``values [n]`` per weight row, ``[B]`` (e.g. a pointing-game hit rate)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {v.shape}")
    v = _values(v, len(v), "values")
    w = _weights(weights, len(v))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w @ v) / w.sum(axis=1)


# ----------------------------------------------------------------------------- patient bootstrap


def _group_codes(groups: Sequence[Any] | None, n: int) -> tuple[np.ndarray, int]:
    """Patient index per row, over the sorted distinct ``str(group)``; None = one patient per row."""
    if groups is None:
        return np.arange(n), n
    keys = [str(g) for g in groups]
    if len(keys) != n:
        raise ValueError(f"groups has {len(keys)} entries but the arrays have {n} rows (one patient id per row)")
    distinct, codes = np.unique(np.array(keys, dtype=str), return_inverse=True)
    return codes.reshape(-1), len(distinct)


def _resample_weights(codes: np.ndarray, n_groups: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Weight matrices ``[b, n]`` of ``n_boot`` patient resamples, in chunks.

    Resample ``r`` draws ``rng.integers(0, G, size=G)`` (``rng =
    numpy.random.default_rng(seed)``, one call per resample, in order): ``G``
    patient indices into the sorted distinct patients; an image's weight is
    how often its patient was drawn.
    """
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ENTRIES // max(len(codes), 1))
    for start in range(0, n_boot, rows):
        draws = [rng.integers(0, n_groups, size=n_groups) for _ in range(min(rows, n_boot - start))]
        counts = np.stack([np.bincount(d, minlength=n_groups) for d in draws])
        yield counts[:, codes].astype(np.float64)


def _evaluate(statistic: Callable[..., Any], arrays: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
    out = np.asarray(statistic(*arrays, weights=weights), dtype=np.float64).reshape(-1)
    if out.shape != (len(weights),):
        raise ValueError(f"statistic must return one value per weight row ({len(weights)}), got shape {out.shape}")
    return out


def bootstrap_ci(
    statistic: Callable[..., Any],
    groups: Sequence[Any] | None,
    *arrays: Any,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile interval of ``statistic`` under resampling whole patients with replacement.

    ``statistic(*arrays, weights=W)`` must return ``[B]`` for a weight matrix
    ``W [B, n]`` (see :func:`weighted_auroc`), NaN where it is undefined.
    ``groups``: one patient id per row (compared as ``str``), or None for one
    patient per row. The estimate is the statistic on the data as given (all
    weights 1); resamples with a NaN statistic are dropped and counted; the
    interval is the ``(1-level)/2`` and ``(1+level)/2`` quantiles
    (``numpy.quantile``, linear) of the rest. Deterministic for a ``seed`` and
    independent of the row order (patients are drawn from their sorted ids).
    Raises ValueError when the statistic is undefined on the data as given.
    """
    _level(level)
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be an integer >= 1, got {n_boot!r}")
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one data array after groups")
    arrays_ = [np.asarray(a) for a in arrays]
    n = len(arrays_[0])
    if any(len(a) != n for a in arrays_):
        raise ValueError(f"arrays must all have the same number of rows, got {[len(a) for a in arrays_]}")
    codes, n_groups = _group_codes(groups, n)
    estimate = _evaluate(statistic, arrays_, np.ones((1, n)))[0]
    if not np.isfinite(estimate):
        raise ValueError("the statistic is undefined on the data as given (e.g. labels of one class only)")
    resamples = _resample_weights(codes, n_groups, int(n_boot), seed)
    values = np.concatenate([_evaluate(statistic, arrays_, w) for w in resamples])
    kept = values[np.isfinite(values)]
    if kept.size:
        low, high = np.quantile(kept, [(1 - level) / 2, (1 + level) / 2])
    else:
        low = high = math.nan
    n_dropped = int(n_boot - kept.size)
    return Interval(float(estimate), float(low), float(high), level, "bootstrap-percentile", int(n_boot), n_dropped)


def bootstrap_difference_ci(
    statistic_a: Callable[..., Any],
    statistic_b: Callable[..., Any],
    groups: Sequence[Any] | None,
    *arrays: Any,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Paired patient-bootstrap interval of ``statistic_a - statistic_b``: both on the same resamples.

    Both statistics receive the same ``*arrays`` and weights (signature as in
    :func:`bootstrap_ci`); a resample where either is undefined is dropped.
    """

    def difference(*data: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return _evaluate(statistic_a, data, weights) - _evaluate(statistic_b, data, weights)

    return bootstrap_ci(difference, groups, *arrays, n_boot=n_boot, level=level, seed=seed)


def auroc_bootstrap_ci(
    labels: Any, scores: Any, groups: Sequence[Any] | None, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> Interval:
    """AUROC with its patient-bootstrap percentile interval (:func:`bootstrap_ci` of :func:`weighted_auroc`)."""
    return bootstrap_ci(weighted_auroc, groups, labels, scores, n_boot=n_boot, level=level, seed=seed)


def _auroc_of_a(labels: Any, a: Any, b: Any, weights: np.ndarray) -> np.ndarray:
    return weighted_auroc(labels, a, weights)


def _auroc_of_b(labels: Any, a: Any, b: Any, weights: np.ndarray) -> np.ndarray:
    return weighted_auroc(labels, b, weights)


def auroc_difference_bootstrap_ci(
    labels: Any,
    scores_a: Any,
    scores_b: Any,
    groups: Sequence[Any] | None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """``AUROC(a) - AUROC(b)`` on the same images, paired patient-bootstrap interval.

    Identical score vectors give exactly ``(0, 0, 0)``.
    """
    return bootstrap_difference_ci(
        _auroc_of_a, _auroc_of_b, groups, labels, scores_a, scores_b, n_boot=n_boot, level=level, seed=seed
    )


def tpr_at_fpr_ci(
    labels: Any,
    scores: Any,
    groups: Sequence[Any] | None,
    fpr: float = 0.05,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """TPR at ``fpr`` (:func:`weighted_tpr_at_fpr`) with its patient-bootstrap percentile interval."""
    return bootstrap_ci(
        partial(weighted_tpr_at_fpr, fpr=fpr), groups, labels, scores, n_boot=n_boot, level=level, seed=seed
    )


def mean_ci(
    values: Any, groups: Sequence[Any] | None, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> Interval:
    """Mean of per-image values (e.g. pointing-game hits in [0, 1], fractional for ties), patient bootstrap."""
    return bootstrap_ci(weighted_mean, groups, values, n_boot=n_boot, level=level, seed=seed)
