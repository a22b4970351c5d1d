"""Detecting adversarial images from per-image features (e.g. CE-map statistics).

The data are *pairs*: row ``i`` of ``features_clean`` and of ``features_adv``
describe the same image before and after the attack. A detector is a binary
classifier (clean = 0, adversarial = 1) trained on one half of the images and
scored on the other. The halves are split by *patient* (``groups``), and both
members of a pair always fall in the same half, so nothing about a test image
or its patient is seen in training: the AUROC measures generalisation to new
patients, not memorisation.

The detectors whose features these functions fit and score are in
:mod:`causal_ie.attacks.detectors`.

:class:`DetectionData` is what one evaluate run saves, so detectors trained on
one run (e.g. one attack) can be scored on another (:func:`transfer_matrix`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from torch import Tensor

from causal_ie.io import atomic_open

# the clean-vs-adversarial classifiers a detector fits on its features
ESTIMATORS: tuple[str, ...] = ("logistic", "gbm")
DETECTION_FILE = "detection.npz"  # what one evaluate run saves (DetectionData), for transfer between runs

__all__ = [
    "DETECTION_FILE",
    "ESTIMATORS",
    "auroc_difference",
    "crossfit_scores",
    "decision_scores",
    "score_detector",
    "DetectionData",
    "DetectionResult",
    "detect",
    "evaluate_detector",
    "features_matrix",
    "fit_detector",
    "load_detection_data",
    "save_detection_data",
    "split_halves",
    "tpr_at_fpr",
    "transfer_auroc",
    "transfer_matrix",
]


@dataclass
class DetectionResult:
    """Scores of a detector on the held-out half (``n_train``/``n_test`` count images, i.e. pairs)."""

    auroc: float
    tpr_at_5fpr: float
    fpr: np.ndarray
    tpr: np.ndarray
    n_train: int
    n_test: int

    def as_dict(self) -> dict[str, float]:
        """The scalar results, for results.json / logging."""
        return {
            "auroc": float(self.auroc),
            "tpr@5fpr": float(self.tpr_at_5fpr),
            "n_train": int(self.n_train),
            "n_test": int(self.n_test),
        }


# ----------------------------------------------------------------------------- split


def split_halves(groups: Sequence[str], seed: int = 0) -> np.ndarray:
    """Patient-grouped half split: bool ``[N]``, True = image in the train half.

    The distinct groups (sorted, so the result does not depend on the order
    images come in) are shuffled with ``numpy.random.default_rng(seed)``; each
    whole group then goes to the half that currently holds fewer images (ties:
    train). Each half thus ends within one group's size of ``N/2``, and both
    are non-empty. Raises ValueError with fewer than 2 distinct groups.
    """
    keys = [str(g) for g in groups]
    distinct = sorted(set(keys))
    if len(distinct) < 2:
        raise ValueError(
            f"groups must hold at least 2 distinct patients to split into two halves, got {len(distinct)}"
        )
    index = {g: i for i, g in enumerate(distinct)}
    codes = np.fromiter((index[g] for g in keys), dtype=np.int64, count=len(keys))
    sizes = np.bincount(codes, minlength=len(distinct))
    in_train = np.zeros(len(distinct), dtype=bool)
    n_train = n_test = 0
    for g in np.random.default_rng(seed).permutation(len(distinct)):
        if n_train <= n_test:
            in_train[g] = True
            n_train += sizes[g]
        else:
            n_test += sizes[g]
    return in_train[codes]


# ----------------------------------------------------------------------------- scores


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, max_fpr: float = 0.05) -> float:
    """Highest TPR on the ROC curve (``sklearn.metrics.roc_curve``) among points with FPR <= ``max_fpr``."""
    if not 0 <= max_fpr <= 1:
        raise ValueError(f"max_fpr must be in [0, 1], got {max_fpr!r}")
    labels = np.asarray(labels)
    if np.unique(labels).size != 2:
        raise ValueError(f"labels must contain both classes, got {np.unique(labels).tolist()}")
    fpr, tpr, _ = roc_curve(labels, np.asarray(scores), drop_intermediate=False)
    return float(tpr[fpr <= max_fpr].max())


def _finite_or_zero(x: np.ndarray) -> np.ndarray:
    """Non-finite feature values (NaN, +-inf: e.g. a correlation with a flat map) -> 0."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(np.isfinite(x), x, 0.0)


def _as_2d(features: Any, name: str) -> np.ndarray:
    x = np.asarray(features.detach().cpu() if isinstance(features, Tensor) else features, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"{name} must be [N, F] (or [N] for one feature), got shape {x.shape}")
    return x


def _pairs(features_clean: Any, features_adv: Any) -> tuple[np.ndarray, np.ndarray]:
    clean = _as_2d(features_clean, "features_clean")
    adv = _as_2d(features_adv, "features_adv")
    if clean.shape != adv.shape:
        raise ValueError(
            f"features_clean {clean.shape} and features_adv {adv.shape} must have the same shape "
            "(row i of both is the same image before and after the attack)"
        )
    return clean, adv


def _mask(mask: Any, n: int, name: str) -> np.ndarray:
    m = np.asarray(mask)
    if m.dtype != bool or m.shape != (n,):
        raise ValueError(f"{name} must be a boolean array of shape ({n},), got dtype {m.dtype} shape {m.shape}")
    if not m.any():
        raise ValueError(f"{name} selects no images")
    return m


def _stack(clean: np.ndarray, adv: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Selected pairs as one labelled design matrix: clean rows (0) then adversarial rows (1)."""
    x = np.concatenate([clean[rows], adv[rows]])
    y = np.repeat(np.array([0, 1]), int(rows.sum()))
    return x, y


def fit_detector(
    features_clean: np.ndarray,
    features_adv: np.ndarray,
    train: np.ndarray,
    kind: str = "logistic",
    seed: int = 0,
) -> Pipeline:
    """Fit a clean (0) vs adversarial (1) classifier on the pairs selected by bool ``train [N]``.

    ``kind="logistic"``: standardise + ``LogisticRegression(max_iter=1000, C=1.0)``;
    ``kind="gbm"``: ``HistGradientBoostingClassifier(max_iter=100, random_state=seed)``.
    Both pipelines first map non-finite values to 0, at fit and predict time,
    so a NaN feature never crashes either step.
    """
    if kind not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}; got {kind!r}")
    clean, adv = _pairs(features_clean, features_adv)
    rows = _mask(train, len(clean), "train")
    x, y = _stack(clean, adv, rows)
    finite = ("finite", FunctionTransformer(_finite_or_zero))
    if kind == "logistic":
        steps = [finite, ("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=1000, C=1.0))]
    else:
        steps = [finite, ("clf", HistGradientBoostingClassifier(max_iter=100, random_state=seed))]
    return Pipeline(steps).fit(x, y)


def decision_scores(estimator: Any, x: np.ndarray) -> np.ndarray:
    """The estimator's decision function on ``x`` (higher = adversarial): ``decision_function``
    where it has one (the log-odds of a logistic regression), else the log-odds of ``predict_proba``."""
    if hasattr(estimator, "decision_function"):
        return np.asarray(estimator.decision_function(x), dtype=float)
    p = np.clip(np.asarray(estimator.predict_proba(x))[:, 1], 1e-12, 1 - 1e-12)
    return np.log(p / (1 - p))


def evaluate_detector(
    estimator: Any,
    features_clean: np.ndarray,
    features_adv: np.ndarray,
    test: np.ndarray,
    n_train: int | None = None,
) -> DetectionResult:
    """Score ``estimator`` on the pairs selected by bool ``test [N]``: AUROC, TPR at 5% FPR, ROC curve.

    ``n_train`` is only recorded in the result; by default it is the number of
    images outside ``test`` (right when train and test halves complement each other).
    """
    clean, adv = _pairs(features_clean, features_adv)
    rows = _mask(test, len(clean), "test")
    x, y = _stack(clean, adv, rows)
    scores = estimator.predict_proba(x)[:, 1]
    fpr, tpr, _ = roc_curve(y, scores)
    return DetectionResult(
        auroc=float(roc_auc_score(y, scores)),
        tpr_at_5fpr=tpr_at_fpr(y, scores, 0.05),
        fpr=fpr,
        tpr=tpr,
        n_train=int((~rows).sum()) if n_train is None else int(n_train),
        n_test=int(rows.sum()),
    )


def detect(
    features_clean: np.ndarray,
    features_adv: np.ndarray,
    groups: Sequence[str],
    seed: int = 0,
    kind: str = "logistic",
) -> DetectionResult:
    """Split by patient (:func:`split_halves`), fit on one half, score on the other."""
    clean, adv = _pairs(features_clean, features_adv)
    if len(groups) != len(clean):
        raise ValueError(f"groups has {len(groups)} entries but the features have {len(clean)} rows (images)")
    train = split_halves(groups, seed)
    estimator = fit_detector(clean, adv, train, kind=kind, seed=seed)
    return evaluate_detector(estimator, clean, adv, ~train, n_train=int(train.sum()))


def crossfit_scores(
    features_clean: np.ndarray,
    features_adv: np.ndarray,
    groups: Sequence[str],
    kind: str = "logistic",
    seed: int = 0,
    repeats: int = 1,
    fit: Callable[[np.ndarray, np.ndarray, np.ndarray, int], Any] | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Out-of-sample detector scores of every image pair: ``(scores_clean [N], scores_adv [N],
    images in a training half)``.

    Two-fold cross-fitting by patient: split the patients in halves (:func:`split_halves`), fit
    on one half and score the other, then the other way round, so each pair is scored by a
    detector that never saw its patient; with ``repeats`` > 1 the scores are averaged over
    splits with seeds ``seed, seed + 1, ...``. All N pairs then enter one AUROC with a
    patient-bootstrap interval, instead of a mean over half-size test sets. ``fit(clean, adv,
    train, seed)`` fits the estimator (a detector's own :meth:`~causal_ie.attacks.detectors.Detector.fit`);
    by default :func:`fit_detector` of ``kind``.
    """
    clean, adv = _pairs(features_clean, features_adv)
    if len(groups) != len(clean):
        raise ValueError(f"groups has {len(groups)} entries but the features have {len(clean)} rows (images)")
    scores_clean, scores_adv = np.zeros(len(clean)), np.zeros(len(clean))
    train_sizes = []
    for r in range(int(repeats)):
        first = split_halves(groups, seed + r)
        for train in (first, ~first):
            if fit is None:
                estimator = fit_detector(clean, adv, train, kind=kind, seed=seed + r)
            else:
                estimator = fit(clean, adv, train, seed + r)
            test = ~train
            scores_clean[test] += estimator.predict_proba(clean[test])[:, 1]
            scores_adv[test] += estimator.predict_proba(adv[test])[:, 1]
            train_sizes.append(int(train.sum()))
    return scores_clean / repeats, scores_adv / repeats, min(train_sizes)


def score_detector(
    scores_clean: np.ndarray, scores_adv: np.ndarray, groups: Sequence[str], n_boot: int = 2000, seed: int = 0
) -> dict[str, float | int]:
    """AUROC and TPR at 5 % FPR of clean (0) vs adversarial (1) scores, each with its 95 %
    patient-bootstrap interval (a pair's two images move together), and ``n_test`` pairs."""
    from causal_ie.intervals import auroc_bootstrap_ci, tpr_at_fpr_ci

    labels, scores, both = _labelled(scores_clean, scores_adv, groups)
    auroc = auroc_bootstrap_ci(labels, scores, both, n_boot=n_boot, seed=seed)
    tpr = tpr_at_fpr_ci(labels, scores, both, fpr=0.05, n_boot=n_boot, seed=seed)
    return {
        "auroc": auroc.estimate,
        "auroc_ci_low": auroc.low,
        "auroc_ci_high": auroc.high,
        "tpr@5fpr": tpr.estimate,
        "tpr@5fpr_ci_low": tpr.low,
        "tpr@5fpr_ci_high": tpr.high,
        "n_test": int(len(scores_clean)),
    }


def auroc_difference(
    scores_a: tuple[np.ndarray, np.ndarray],
    scores_b: tuple[np.ndarray, np.ndarray],
    groups: Sequence[str],
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """AUROC of detector a minus detector b on the same pairs, with the 95 % interval of the
    difference (paired patient bootstrap). ``scores_*`` are (clean, adversarial) arrays."""
    from causal_ie.intervals import auroc_difference_bootstrap_ci

    labels, a, both = _labelled(*scores_a, groups)
    _, b, _ = _labelled(*scores_b, groups)
    diff = auroc_difference_bootstrap_ci(labels, a, b, both, n_boot=n_boot, seed=seed)
    return diff.estimate, diff.low, diff.high


def _labelled(scores_clean: np.ndarray, scores_adv: np.ndarray, groups: Sequence[str]):
    """Stacked labels (0 clean, 1 adversarial), scores and the groups of both copies."""
    clean, adv = np.asarray(scores_clean, dtype=float), np.asarray(scores_adv, dtype=float)
    labels = np.r_[np.zeros(len(clean)), np.ones(len(adv))]
    return labels, np.r_[clean, adv], [*groups, *groups]


def features_matrix(features: Mapping[str, Tensor | np.ndarray]) -> tuple[np.ndarray, list[str]]:
    """``{name: [N]}`` -> ``([N, F] float64 array, names)``, columns in the mapping's order."""
    if not features:
        raise ValueError("features is empty: expected a mapping {name: [N] values}")
    names = list(features)
    columns = []
    for name in names:
        value = features[name]
        col = np.asarray(value.detach().cpu() if isinstance(value, Tensor) else value, dtype=np.float64)
        if col.ndim != 1:
            raise ValueError(f"feature {name!r} must be 1-D [N], got shape {col.shape}")
        columns.append(col)
    lengths = {len(c) for c in columns}
    if len(lengths) != 1:
        raise ValueError(f"features must all have the same length N, got {dict(zip(names, map(len, columns)))}")
    return np.stack(columns, axis=1), names


# ----------------------------------------------------------------------------- saved runs, transfer


_ARRAYS = ("features_clean", "features_adv", "feature_names", "ids", "groups", "seed")


@dataclass
class DetectionData:
    """Features of one evaluate run's image pairs, saved so detectors can be compared across runs."""

    features_clean: np.ndarray  # [N, F]
    features_adv: np.ndarray  # [N, F]
    feature_names: list[str]
    ids: list[str]  # image ids
    groups: list[str]  # patient ids
    seed: int

    def __post_init__(self) -> None:
        self.features_clean, self.features_adv = _pairs(self.features_clean, self.features_adv)
        self.feature_names = [str(x) for x in self.feature_names]
        self.ids = [str(x) for x in self.ids]
        self.groups = [str(x) for x in self.groups]
        self.seed = int(self.seed)
        n, f = self.features_clean.shape
        if len(self.feature_names) != f:
            raise ValueError(f"feature_names has {len(self.feature_names)} names for {f} feature columns")
        if len(self.ids) != n or len(self.groups) != n:
            raise ValueError(f"ids ({len(self.ids)}) and groups ({len(self.groups)}) must have one entry per row ({n})")


def save_detection_data(path: str | Path, data: DetectionData) -> Path:
    """Write ``data`` as a compressed ``.npz`` at exactly ``path``, atomically."""
    with atomic_open(path, "wb") as f:
        np.savez_compressed(
            f,
            features_clean=data.features_clean,
            features_adv=data.features_adv,
            feature_names=np.array(data.feature_names, dtype=str),
            ids=np.array(data.ids, dtype=str),
            groups=np.array(data.groups, dtype=str),
            seed=np.array(data.seed, dtype=np.int64),
        )
    path = Path(path)
    return path


def load_detection_data(path: str | Path) -> DetectionData:
    """Read what :func:`save_detection_data` wrote; FileNotFoundError / ValueError name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no detection data at {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as err:  # not an npz at all
        raise ValueError(f"{path} is not a detection-data .npz file: {err}") from err
    with archive:
        missing = [key for key in _ARRAYS if key not in archive.files]
        if missing:
            raise ValueError(f"{path} lacks the array(s) {', '.join(missing)} expected of detection data")
        return DetectionData(
            features_clean=archive["features_clean"],
            features_adv=archive["features_adv"],
            feature_names=archive["feature_names"].tolist(),
            ids=archive["ids"].tolist(),
            groups=archive["groups"].tolist(),
            seed=int(archive["seed"]),
        )


def _fit_source(source: DetectionData, kind: str) -> tuple[Pipeline, set[str]]:
    """The detector of a run's own train half and the patients it saw."""
    train = split_halves(source.groups, source.seed)
    estimator = fit_detector(source.features_clean, source.features_adv, train, kind=kind, seed=source.seed)
    seen = {g for g, t in zip(source.groups, train) if t}
    return estimator, seen


def _check_same_features(source: DetectionData, target: DetectionData) -> None:
    if source.feature_names != target.feature_names:
        raise ValueError(
            "source and target runs must have the same features in the same order; "
            f"source has {source.feature_names}, target has {target.feature_names}"
        )


def _score_target(estimator: Pipeline, seen: set[str], target: DetectionData) -> float:
    """AUROC on the target images of patients outside ``seen`` (NaN if there are none)."""
    unseen = np.array([g not in seen for g in target.groups], dtype=bool)
    if not unseen.any():
        return float("nan")
    return evaluate_detector(estimator, target.features_clean, target.features_adv, unseen).auroc


def transfer_auroc(source: DetectionData, target: DetectionData, kind: str = "logistic") -> float:
    """AUROC on ``target`` of the detector trained on ``source``'s train half.

    Scored only on target images whose patient is not among the source
    train-half patients (no patient is seen in training); NaN if none is left.
    With ``target is source`` this is exactly ``detect(...)`` on the source run.
    """
    _check_same_features(source, target)
    estimator, seen = _fit_source(source, kind)
    return _score_target(estimator, seen, target)


def transfer_matrix(runs: Mapping[str, DetectionData], kind: str = "logistic") -> pd.DataFrame:
    """AUROC of every (source, target) pair: rows = source (trained on), columns = target (tested on).

    The diagonal is each run's own held-out AUROC on the first split (``detect`` with ``seed``).
    One detector is fitted per source run.
    """
    names = list(runs)
    table = pd.DataFrame(np.nan, index=pd.Index(names, name="source"), columns=pd.Index(names, name="target"))
    for src in names:
        for tgt in names:  # fail before any fitting
            _check_same_features(runs[src], runs[tgt])
    for src in names:
        estimator, seen = _fit_source(runs[src], kind)
        for tgt in names:
            table.loc[src, tgt] = _score_target(estimator, seen, runs[tgt])
    return table
