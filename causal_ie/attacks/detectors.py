"""Standard adversarial-example detectors, each one score per image (higher = more likely adversarial).

* :func:`feature_squeezing_score`: Xu, Evans & Qi 2018 (NDSS), "Feature
  Squeezing": how far the prediction moves when the input is squeezed.
* :class:`MahalanobisDetector`: Lee, Lee, Lee & Shin 2018 (NeurIPS): Mahalanobis
  distance of the classifier's penultimate features (:func:`penultimate_features`)
  to Gaussians fitted on clean images.
* :class:`LIDDetector`: Ma et al. 2018 (ICLR): local intrinsic dimensionality of
  the penultimate features among clean reference images.

``model`` maps ``[N, C, H, W]`` images in [0, 1] to logits ``[N, K]`` (one per
finding, sigmoid outputs). Every call runs under ``torch.no_grad()`` with the
model in eval mode and gives each module its own mode back afterwards. The
scores are meant as detector features on the same patient-grouped splits as
the CE detector (:mod:`causal_ie.attacks.detection`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from scipy.spatial.distance import cdist
from sklearn.covariance import EmpiricalCovariance, LedoitWolf
from torch import Tensor, nn

from causal_ie.runtime import eval_mode, to_model

__all__ = [
    "LIDDetector",
    "MahalanobisDetector",
    "bit_depth_squeeze",
    "classifier_layer",
    "feature_squeezing_score",
    "features_and_logits",
    "median_squeeze",
    "penultimate_features",
]


def _check_images(images: Any, unit_range: bool = True) -> Tensor:
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a floating torch.Tensor [N, C, H, W], got {shape}")
    if images.shape[0] == 0:
        raise ValueError("images must hold at least one image, got N = 0")
    if unit_range and images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError(
            f"images must be in [0, 1], got values in [{images.min().item():.4g}, {images.max().item():.4g}]"
        )
    return images


# ----------------------------------------------------------------------------- feature squeezing


def bit_depth_squeeze(images: Tensor, bits: int) -> Tensor:
    """Reduce [0, 1] images to ``bits`` bits per channel: ``round(x (2^b - 1)) / (2^b - 1)``.

    As Xu et al. 2018 (round half to even, as ``numpy.rint``); an image already
    at that depth comes back unchanged.
    """
    if isinstance(bits, bool) or int(bits) != bits or not 1 <= bits <= 24:
        raise ValueError(f"bit_depth must be an integer in [1, 24], got {bits!r}")
    levels = 2 ** int(bits) - 1
    return torch.round(images * levels) / levels


def _symmetric_index(size: int, before: int, after: int, device: torch.device) -> Tensor:
    """Indices that pad an axis of ``size`` by mirroring with the edge repeated (d c b a | a b c d)."""
    i = torch.arange(-before, size + after, device=device)
    i = torch.where(i < 0, -i - 1, i)
    return torch.where(i >= size, 2 * size - i - 1, i)


def median_squeeze(images: Tensor, size: int) -> Tensor:
    """Spatial ``size x size`` median filter per channel, as ``scipy.ndimage.median_filter(mode="reflect")``.

    Xu et al. 2018's squeezer (their code calls scipy). Conventions of scipy:
    the window of pixel ``i`` covers ``i - size//2 .. i + size - 1 - size//2``
    (``size=2``: the pixel and the one above/left of it), edges are padded by
    mirroring with the edge pixel repeated, and for an even ``size`` the
    median is the upper one (rank ``size^2 // 2`` from 0 in the sorted window).
    ``size`` must be in ``[1, min(H, W)]``; 1 is the identity.
    """
    _check_images(images, unit_range=False)
    h, w = images.shape[-2:]
    if isinstance(size, bool) or int(size) != size or not 1 <= size <= min(h, w):
        raise ValueError(f"median_size must be an integer in [1, min(H, W) = {min(h, w)}], got {size!r}")
    size = int(size)
    before, after = size // 2, size - 1 - size // 2
    padded = images.index_select(-2, _symmetric_index(h, before, after, images.device))
    padded = padded.index_select(-1, _symmetric_index(w, before, after, images.device))
    windows = padded.unfold(2, size, 1).unfold(3, size, 1).reshape(*images.shape, size * size)
    return windows.kthvalue(size * size // 2 + 1, dim=-1).values


def _probabilities(model: nn.Module, images: Tensor) -> Tensor:
    logits = model(to_model(model, images))
    return torch.sigmoid(logits.reshape(len(images), -1).float())


def feature_squeezing_score(
    model: nn.Module, images: Tensor, bit_depth: int | None = 5, median_size: int | None = 2
) -> Tensor:
    """Feature-squeezing score ``[N]`` (Xu et al. 2018, joint detection with several squeezers).

    ``max over squeezers s of || p(x) - p(s(x)) ||_1``, with ``p`` the vector of
    sigmoid probabilities over all K findings (Xu et al. use softmax over
    classes; a multi-label classifier has K independent probabilities), so a
    score lies in [0, K]. Squeezers: :func:`bit_depth_squeeze` with
    ``bit_depth`` bits and :func:`median_squeeze` with a ``median_size`` window;
    either may be None to leave it out (not both). Images in [0, 1], float32
    on the images' device.
    """
    images = _check_images(images)
    squeezers: list[Callable[[Tensor], Tensor]] = []
    if bit_depth is not None:
        bit_depth_squeeze(images[:1, :, :1, :1], bit_depth)  # validate before running the model
        squeezers.append(lambda x: bit_depth_squeeze(x, bit_depth))
    if median_size is not None:
        median_squeeze(images[:1], median_size)
        squeezers.append(lambda x: median_squeeze(x, median_size))
    if not squeezers:
        raise ValueError("bit_depth and median_size are both None: feature squeezing needs at least one squeezer")
    with torch.no_grad(), eval_mode(model):
        base = _probabilities(model, images)
        distances = [(base - _probabilities(model, squeeze(images))).abs().sum(dim=1) for squeeze in squeezers]
    return torch.stack(distances).amax(dim=0)


# ----------------------------------------------------------------------------- penultimate features


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` that turns the penultimate features into the logits.

    Looked up in order: ``model.backbone.get_classifier()`` (the project's
    Classifier wraps a timm model as ``backbone``), ``model.get_classifier()``
    (a bare timm model), then the last ``nn.Linear`` among ``model.modules()``
    (registration order; right for plain ``nn.Sequential``-like heads).
    """
    backbone = getattr(model, "backbone", None)
    for candidate in (backbone, model):
        get_classifier = getattr(candidate, "get_classifier", None)
        if isinstance(candidate, nn.Module) and callable(get_classifier):
            head = get_classifier()
            if isinstance(head, nn.Linear):
                return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"model ({type(model).__name__}) has no nn.Linear classifier layer to take features from")
    return linears[-1]


def features_and_logits(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """``(features [N, D], logits [N, K])`` of one forward pass, detached.

    The features are the input of :func:`classifier_layer`, caught by a
    forward pre-hook that is removed again whatever happens. For a timm model
    they equal ``forward_head(forward_features(x), pre_logits=True)``.
    Raises RuntimeError if that layer does not run exactly once per forward.
    """
    images = _check_images(images, unit_range=False)
    layer = classifier_layer(model)
    caught: list[Tensor] = []

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        caught.append(args[0].detach())

    handle = layer.register_forward_pre_hook(hook)
    try:
        with torch.no_grad(), eval_mode(model):
            logits = model(to_model(model, images)).detach()
    finally:
        handle.remove()
    if len(caught) != 1:
        raise RuntimeError(
            f"the classifier layer {type(layer).__name__}({layer.in_features}->{layer.out_features}) ran "
            f"{len(caught)} times in one forward pass, expected once"
        )
    features = caught[0]
    if features.shape != (len(images), layer.in_features):
        raise RuntimeError(f"the classifier layer's input has shape {tuple(features.shape)}, expected [N, D]")
    return features, logits


def penultimate_features(model: nn.Module, images: Tensor) -> Tensor:
    """The classifier's penultimate features ``[N, D]`` (see :func:`features_and_logits`)."""
    return features_and_logits(model, images)[0]


def _matrix(features: Any, name: str, dim: int | None = None) -> np.ndarray:
    x = features.detach().cpu().double().numpy() if isinstance(features, Tensor) else np.asarray(features, np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array [N, D], got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} must have D = {dim} columns (as the fitted features), got {x.shape[1]}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} must be finite")
    return x


# ----------------------------------------------------------------------------- Mahalanobis


class MahalanobisDetector:
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

    def fit(self, features: Any, classes: Any = None) -> MahalanobisDetector:
        """Fit on clean ``features [N, D]`` with ``classes [N]`` (any ids) or None (one Gaussian)."""
        x = _matrix(features, "features")
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
            raise RuntimeError("MahalanobisDetector: call fit(features) before scoring")
        x = _matrix(features, "features", self.means_.shape[1])
        out = np.empty((len(x), len(self.means_)))
        for c, mean in enumerate(self.means_):
            diff = x - mean
            out[:, c] = np.einsum("nd,de,ne->n", diff, self.precision_, diff, optimize=True)
        return out

    def score(self, features: Any) -> Tensor:
        """``min_c (f - mu_c)^T Sigma^-1 (f - mu_c)`` per row, float64 ``[N]`` on the CPU."""
        return torch.from_numpy(self.distances(features).min(axis=1))


# ----------------------------------------------------------------------------- LID


class LIDDetector:
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

    def fit(self, reference: Any) -> LIDDetector:
        """Keep clean ``reference [M, D]`` features (``M >= k``)."""
        ref = _matrix(reference, "reference")
        if len(ref) < self.k:
            raise ValueError(f"reference must hold at least k = {self.k} rows, got {len(ref)}")
        self.reference_ = ref
        return self

    def score(self, features: Any) -> Tensor:
        """LID of each row of ``features [N, D]`` among the ``k`` nearest reference rows, float64 ``[N]``."""
        if not hasattr(self, "reference_"):
            raise RuntimeError("LIDDetector: call fit(reference) before scoring")
        x = _matrix(features, "features", self.reference_.shape[1])
        distances = cdist(x, self.reference_)
        nearest = np.sort(np.partition(distances, self.k - 1, axis=1)[:, : self.k], axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            lid = self.k / np.log(nearest[:, -1:] / nearest).sum(axis=1)
        lid[nearest[:, 0] == 0] = 0.0  # a duplicate of a reference point (also covers 0/0)
        return torch.from_numpy(lid)
