"""Mahalanobis distance of the penultimate features to clean images (Lee, Lee, Lee & Shin 2018, NeurIPS)."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from sklearn.covariance import EmpiricalCovariance, LedoitWolf
from torch import Tensor

from causal_ie.attacks.detectors.penultimate import PenultimateDetector, feature_matrix

__all__ = ["MahalanobisDetector", "MahalanobisDistance"]


class MahalanobisDistance:
    """Mahalanobis distance to Gaussians of clean penultimate features (Lee et al. 2018).

    :meth:`fit` on clean reference features ``f_i`` with optional class ids
    ``c_i``: class means ``mu_c`` and one tied covariance ``Sigma`` of the
    features centred on their class means, ``1/N sum_i (f_i - mu_{c_i})(f_i -
    mu_{c_i})^T`` (Lee et al.'s generative classifier); :meth:`score` is
    ``min_c (f - mu_c)^T Sigma^-1 (f - mu_c)``, i.e. minus their confidence
    score ``M(x)`` (no input preprocessing, no layer ensemble).

    Classes for a multi-label classifier: findings are not exclusive, so there
    is no class partition of Lee et al.'s kind. ``classes=None`` (default) fits
    one class-agnostic Gaussian, the simplest defensible choice: it needs no
    labels and asks "are these features typical of clean images?". Any
    partition can be passed instead, e.g. the index of each clean image's most
    likely finding (what ``attack.target=top`` attacks).

    ``covariance="ledoit_wolf"`` (default) shrinks the covariance
    (``sklearn.covariance.LedoitWolf``), needed when D approaches or exceeds the
    number of images; ``"empirical"`` (``EmpiricalCovariance``) requires
    ``N - n_classes >= D``. Fit on clean images *outside* the detection pairs
    (e.g. the classifier's training or validation split): an image in the fit
    set is closer to the means than a new one.
    """

    def __init__(self, covariance: Literal["ledoit_wolf", "empirical"] = "ledoit_wolf"):
        if covariance not in ("ledoit_wolf", "empirical"):
            raise ValueError(f"covariance must be 'ledoit_wolf' or 'empirical', got {covariance!r}")
        self.covariance = covariance

    def fit(self, features: Any, classes: Any = None) -> MahalanobisDistance:
        """Fit on clean ``features [N, D]`` with ``classes [N]`` (any ids) or None (one Gaussian)."""
        x = feature_matrix(features, "features")
        if classes is None:
            codes = np.zeros(len(x), dtype=np.int64)
            self.classes_ = np.array([0])
        else:
            labels = np.asarray(classes)
            if labels.shape != (len(x),):
                raise ValueError(f"classes must be 1-D, one id per feature row ({len(x)}); got shape {labels.shape}")
            self.classes_, codes = np.unique(labels, return_inverse=True)
        n_classes = len(self.classes_)
        if len(x) - n_classes < 1:
            raise ValueError(f"features: need more rows ({len(x)}) than classes ({n_classes}) to estimate a covariance")
        if self.covariance == "empirical" and len(x) - n_classes < x.shape[1]:
            raise ValueError(
                f"features: the empirical covariance of {len(x)} rows around {n_classes} mean(s) in D = {x.shape[1]} "
                "dimensions is singular; use covariance='ledoit_wolf'"
            )
        self.means_ = np.stack([x[codes == c].mean(axis=0) for c in range(n_classes)])
        residuals = x - self.means_[codes]
        estimator = LedoitWolf if self.covariance == "ledoit_wolf" else EmpiricalCovariance
        fitted = estimator(assume_centered=True).fit(residuals)
        self.covariance_ = fitted.covariance_
        self.precision_ = fitted.precision_
        return self

    def distances(self, features: Any) -> np.ndarray:
        """Squared Mahalanobis distances ``[N, n_classes]`` to each class mean (float64)."""
        if not hasattr(self, "precision_"):
            raise RuntimeError("MahalanobisDistance: call fit(features) before scoring")
        x = feature_matrix(features, "features", self.means_.shape[1])
        out = np.empty((len(x), len(self.means_)))
        for c, mean in enumerate(self.means_):
            diff = x - mean
            out[:, c] = np.einsum("nd,de,ne->n", diff, self.precision_, diff, optimize=True)
        return out

    def score(self, features: Any) -> Tensor:
        """``min_c (f - mu_c)^T Sigma^-1 (f - mu_c)`` per row, float64 ``[N]`` on the CPU."""
        return torch.from_numpy(self.distances(features).min(axis=1))

    def differentiable_score(self, features: Tensor) -> Tensor:
        """:meth:`score` as a torch function of ``features`` [N, D] (their device and dtype),
        for an attacker who differentiates through it."""
        if not hasattr(self, "precision_"):
            raise RuntimeError("MahalanobisDistance: call fit(features) before scoring")
        means = torch.as_tensor(self.means_, dtype=features.dtype, device=features.device)
        precision = torch.as_tensor(self.precision_, dtype=features.dtype, device=features.device)
        diff = features[:, None, :] - means[None]  # [N, C, D]
        return torch.einsum("ncd,de,nce->nc", diff, precision, diff).amin(dim=1)


class MahalanobisDetector(PenultimateDetector):
    """``mahalanobis``: :class:`MahalanobisDistance` of the penultimate features to one Gaussian
    fitted on the clean reference images (``covariance``: ``ledoit_wolf`` or ``empirical``)."""

    feature = "distance"

    def __init__(self, covariance: Literal["ledoit_wolf", "empirical"] = "ledoit_wolf", estimator: str = "logistic"):
        super().__init__(MahalanobisDistance(covariance), estimator)
