"""The classifier's penultimate features: what Mahalanobis and LID detectors read."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from causal_ie.attacks.detectors.base import Detector, check_images
from causal_ie.runtime import eval_mode, to_model

__all__ = ["PenultimateDetector", "classifier_layer", "feature_matrix", "features_and_logits", "penultimate_features", "reference_features"]


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


def features_and_logits(model: nn.Module, images: Tensor, differentiable: bool = False) -> tuple[Tensor, Tensor]:
    """``(features [N, D], logits [N, K])`` of one forward pass, detached (``differentiable``:
    with their autograd graph, for an attacker who differentiates through them).

    The features are the input of :func:`classifier_layer`, caught by a
    forward pre-hook that is removed again whatever happens. For a timm model
    they equal ``forward_head(forward_features(x), pre_logits=True)``.
    Raises RuntimeError if that layer does not run exactly once per forward.
    """
    images = check_images(images, unit_range=False)
    layer = classifier_layer(model)
    caught: list[Tensor] = []

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        caught.append(args[0] if differentiable else args[0].detach())

    handle = layer.register_forward_pre_hook(hook)
    try:
        with torch.set_grad_enabled(differentiable), eval_mode(model):
            logits = model(to_model(model, images))
        logits = logits if differentiable else logits.detach()
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


def penultimate_features(model: nn.Module, images: Tensor, differentiable: bool = False) -> Tensor:
    """The classifier's penultimate features ``[N, D]`` (see :func:`features_and_logits`)."""
    return features_and_logits(model, images, differentiable)[0]


def feature_matrix(features: Any, name: str, dim: int | None = None) -> np.ndarray:
    x = features.detach().cpu().double().numpy() if isinstance(features, Tensor) else np.asarray(features, np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array [N, D], got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} must have D = {dim} columns (as the fitted features), got {x.shape[1]}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} must be finite")
    return x


def reference_features(classifier: nn.Module, images: Any, name: str) -> Tensor:
    """Penultimate features [M, D] of batches of clean reference images; ``name`` (the detector)
    is named when there are none."""
    features = [penultimate_features(classifier, x) for x in images]
    if not features:
        raise ValueError(f"detector {name} needs clean reference images (detection.reference_images; the validation split is empty)")
    return torch.cat(features)


class PenultimateDetector(Detector):
    """A detector that scores the classifier's penultimate features with ``scorer``, fitted on
    the clean reference images' features (``scorer``: ``fit(features)``, ``score(features)`` and
    ``differentiable_score(features)``, e.g. Mahalanobis distance or LID). Its one feature is
    called ``feature``."""

    needs_reference = True
    differentiable = True
    feature = "score"

    def __init__(self, scorer: Any, estimator: str = "logistic"):
        super().__init__(estimator)
        self.scorer = scorer
        self.fitted = False

    def fit_reference(self, classifier: nn.Module, images: Any) -> None:
        self.scorer.fit(reference_features(classifier, images, type(self).__name__))
        self.fitted = True

    def features(self, classifier: nn.Module, images: Tensor, probs: Tensor, index: Tensor,
                 differentiable: bool = False) -> dict[str, Tensor]:
        if not self.fitted:
            raise RuntimeError(f"{type(self).__name__}: fit_reference(classifier, images) first (the attack study does)")
        if differentiable:
            return {self.feature: self.scorer.differentiable_score(penultimate_features(classifier, images, True))}
        return {self.feature: self.scorer.score(penultimate_features(classifier, images)).to(images.device)}
