"""``max_prob``: the classifier's confidence (an attacked image often sits near a threshold, or
is pushed far past it)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from causal_ie.attacks.detectors.base import Detector
from causal_ie.runtime import to_model

__all__ = ["MaxProbDetector", "max_prob"]


def max_prob(probs: Tensor) -> Tensor:
    """The ``max_prob`` baseline score: max over findings of the predicted probability, ``[N, K] -> [N]``
    (NaN probabilities, of findings the model does not predict, left out)."""
    probs = torch.as_tensor(probs)
    if probs.ndim != 2:
        raise ValueError(f"probs must be [N, K], got shape {tuple(probs.shape)}")
    return probs.nan_to_num(float("-inf")).amax(dim=1)


class MaxProbDetector(Detector):
    """``max_prob``: the largest predicted probability over the findings (one score per image)."""

    differentiable = True

    def features(self, classifier: nn.Module, images: Tensor, probs: Tensor, index: Tensor,
                 differentiable: bool = False) -> Mapping[str, Tensor]:
        if differentiable:  # the probabilities of these images, with their graph
            probs = classifier(to_model(classifier, images)).float().sigmoid()
        return {"score": max_prob(probs)}
