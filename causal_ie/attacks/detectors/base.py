"""The detector protocol: what the attack study asks of every detector of adversarial images.

A detector turns images into a few numbers per image (its *features*: one score for
``max_prob``, dozens of CE statistics for ``ce``). The study then fits the detector's
*estimator* (a clean-vs-adversarial classifier on those features) on training pairs and
scores held-out pairs with it, cross-fitted by patient
(:func:`causal_ie.attacks.detection.crossfit_scores`); a one-feature detector's fitted
logistic regression is a monotone map of its score, so its AUROC is the score's own.

A detector of one's own is a class with this interface (subclassing :class:`Detector` is
the easy way) and one config node, e.g.
``+detection.detectors.mine={_target_: mymodule.MyDetector, ...}``: nothing in the
library names it. What a subclass may override:

- :meth:`features` (required): ``{name: [B] tensor}`` of a batch of images.
- :meth:`fit_reference`: fit on clean reference images (the validation split, never a
  detection pair) before the test loop; set ``needs_reference = True``.
- :meth:`fit`: the estimator fitted on the training pairs' features (default: standardised
  logistic regression, or gradient boosting with ``estimator=gbm``).
- ``differentiable = True``: ``features(..., differentiable=True)`` keeps the autograd graph
  (non-differentiable steps through a BPDA surrogate, :func:`causal_ie.attacks.adaptive.bpda`),
  so the adaptive attacker can differentiate through the detector.
- ``randomised = True``: the features draw randomness per call (the attacker then averages
  gradients over draws, EOT).
- ``reads_ce = True``: the detector reads CE maps; such detectors are compared against every
  detector that does not (``auroc_minus``).
- :meth:`views`: subsets of its features scored as detectors of their own (the CE detector's
  pixel and latent halves).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch import Tensor, nn

from causal_ie import validators
from causal_ie.attacks.detection import ESTIMATORS, fit_detector

__all__ = ["Detector", "check_images"]


class Detector:
    """Base class of the attack study's detectors (see the module docstring).

    Args:
        estimator: ``logistic`` (standardised logistic regression; the adaptive attacker can
            differentiate through it) or ``gbm`` (sklearn's HistGradientBoosting).
    """

    needs_reference: bool = False
    differentiable: bool = False
    randomised: bool = False
    reads_ce: bool = False

    def __init__(self, estimator: str = "logistic"):
        self.estimator = validators.choice("estimator", estimator, ESTIMATORS)

    def fit_reference(self, classifier: nn.Module, images: Sequence[Tensor]) -> None:
        """Fit on batches of clean reference images (only called when ``needs_reference``)."""

    def features(
        self, classifier: nn.Module, images: Tensor, probs: Tensor, index: Tensor, differentiable: bool = False
    ) -> Mapping[str, Tensor]:
        """Features ``{name: [B]}`` of ``images`` [B, C, H, W] in [0, 1]. ``probs`` [B, K]: the
        classifier's probabilities on them (NaN for findings it does not predict);
        ``index`` [B]: the images' dataset indices, e.g. to seed per-image draws so an image
        gets the same draws in any batch or process.

        ``differentiable=True`` (the adaptive attacker's call, only for ``differentiable``
        detectors): the features keep their autograd graph w.r.t. ``images``; ``probs`` and
        ``index`` are then None (compute what is needed from ``images``; a randomised detector
        draws fresh randomness)."""
        raise NotImplementedError(f"{type(self).__name__} must define features(classifier, images, probs, index)")

    def fit(self, clean: np.ndarray, adv: np.ndarray, train: np.ndarray, seed: int = 0) -> Any:
        """The estimator (with ``predict_proba``) fitted on the pairs ``train`` [N] (bool) of
        clean and adversarial features [N, F]."""
        return fit_detector(clean, adv, train, kind=self.estimator, seed=seed)

    def views(self, names: Sequence[str]) -> dict[str, list[str]]:
        """Extra detectors scored from subsets of this one's feature ``names``: {row: names}."""
        return {}

    def describe(self) -> dict[str, Any]:
        """What results.json records of this detector beside its scores."""
        return {"estimator": self.estimator, "target": f"{type(self).__module__}.{type(self).__qualname__}"}


def check_images(images: Any, unit_range: bool = True) -> Tensor:
    """``images`` as a non-empty floating tensor [N, C, H, W] (in [0, 1] with ``unit_range``)."""
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
