"""Local intrinsic dimensionality of the penultimate features (Ma et al. 2018, ICLR)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.spatial.distance import cdist
from torch import Tensor

from causal_ie.attacks.detectors.penultimate import PenultimateDetector, feature_matrix

__all__ = ["LIDDetector", "LocalIntrinsicDimensionality"]


class LocalIntrinsicDimensionality:
    """Local intrinsic dimensionality of features among clean reference features (Ma et al. 2018).

    Maximum-likelihood estimate from the Euclidean distances ``r_1 <= ... <=
    r_k`` to the ``k`` nearest reference points: ``LID = -(1/k sum_i log(r_i /
    r_k))^-1 = k / sum_i log(r_k / r_i)``. Adversarial regions tend to have a
    higher LID. Ma et al. use the clean minibatch as reference and every
    layer; here one layer (e.g. the penultimate features) and a fixed clean
    reference set, which should hold no image that is scored (an exact
    duplicate, ``r_1 = 0``, gives LID 0; ``k`` equidistant neighbours give inf).
    """

    def __init__(self, k: int = 20):
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise ValueError(f"k must be an integer >= 1 (neighbours), got {k!r}")
        self.k = int(k)

    def fit(self, reference: Any) -> LocalIntrinsicDimensionality:
        """Keep clean ``reference [M, D]`` features (``M >= k``)."""
        ref = feature_matrix(reference, "reference")
        if len(ref) < self.k:
            raise ValueError(f"reference must hold at least k = {self.k} rows, got {len(ref)}")
        self.reference_ = ref
        return self

    def score(self, features: Any) -> Tensor:
        """LID of each row of ``features [N, D]`` among the ``k`` nearest reference rows, float64 ``[N]``."""
        if not hasattr(self, "reference_"):
            raise RuntimeError("LocalIntrinsicDimensionality: call fit(reference) before scoring")
        x = feature_matrix(features, "features", self.reference_.shape[1])
        distances = cdist(x, self.reference_)
        nearest = np.sort(np.partition(distances, self.k - 1, axis=1)[:, : self.k], axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            lid = self.k / np.log(nearest[:, -1:] / nearest).sum(axis=1)
        lid[nearest[:, 0] == 0] = 0.0  # a duplicate of a reference point (also covers 0/0)
        return torch.from_numpy(lid)

    def differentiable_score(self, features: Tensor) -> Tensor:
        """:meth:`score` as a torch function of ``features`` [N, D] (the distances to the k
        nearest reference rows are differentiable; which rows are nearest is held fixed)."""
        if not hasattr(self, "reference_"):
            raise RuntimeError("LocalIntrinsicDimensionality: call fit(reference) before scoring")
        reference = torch.as_tensor(self.reference_, dtype=features.dtype, device=features.device)
        nearest = torch.cdist(features, reference).topk(self.k, dim=1, largest=False).values  # ascending
        logs = torch.log(nearest[:, -1:] / nearest.clamp_min(torch.finfo(features.dtype).tiny)).sum(dim=1)
        lid = self.k / logs
        return torch.where(nearest[:, 0] == 0, torch.zeros_like(lid), lid)


class LIDDetector(PenultimateDetector):
    """``lid``: :class:`LocalIntrinsicDimensionality` of the penultimate features among the
    clean reference images' (``k`` nearest neighbours)."""

    feature = "lid"

    def __init__(self, k: int = 20, estimator: str = "logistic"):
        super().__init__(LocalIntrinsicDimensionality(k), estimator)
