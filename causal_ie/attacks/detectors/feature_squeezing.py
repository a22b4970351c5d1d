"""Feature squeezing (Xu, Evans & Qi 2018, NDSS): how far the prediction moves when the
input is squeezed (fewer bits per pixel, a median filter). Adversarial perturbations live in
the detail the squeezers remove."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from causal_ie import validators
from causal_ie.attacks.adaptive import bpda
from causal_ie.attacks.detectors.base import Detector, check_images
from causal_ie.runtime import eval_mode, to_model

__all__ = ["FeatureSqueezingDetector", "bit_depth_squeeze", "feature_squeezing_score", "median_squeeze"]


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
    check_images(images, unit_range=False)
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
    model: nn.Module, images: Tensor, bit_depth: int | None = 5, median_size: int | None = 2,
    differentiable: bool = False,
) -> Tensor:
    """Feature-squeezing score ``[N]`` (Xu et al. 2018, joint detection with several squeezers).

    ``max over squeezers s of || p(x) - p(s(x)) ||_1``, with ``p`` the vector of
    sigmoid probabilities over all K findings (Xu et al. use softmax over
    classes; a multi-label classifier has K independent probabilities), so a
    score lies in [0, K]. Squeezers: :func:`bit_depth_squeeze` with
    ``bit_depth`` bits and :func:`median_squeeze` with a ``median_size`` window;
    either may be None to leave it out (not both). Images in [0, 1], float32
    on the images' device.

    ``differentiable``: the score keeps its autograd graph; the squeezers, flat almost
    everywhere (rounding) or a selection (the median), pass the gradient through unchanged
    (BPDA with the identity, Athalye et al. 2018), so the attacker follows ``p(s(x))`` as if
    ``s(x) = x`` inside the squeezer.
    """
    images = check_images(images)
    squeezers: list[Callable[[Tensor], Tensor]] = []
    if bit_depth is not None:
        bit_depth_squeeze(images[:1, :, :1, :1].detach(), bit_depth)  # validate before running the model
        squeezers.append(lambda x: bit_depth_squeeze(x, bit_depth))
    if median_size is not None:
        median_squeeze(images[:1].detach(), median_size)
        squeezers.append(lambda x: median_squeeze(x, median_size))
    if differentiable:
        squeezers = [lambda x, s=s: bpda(s(x.detach()), x) for s in squeezers]
    if not squeezers:
        raise ValueError("bit_depth and median_size are both None: feature squeezing needs at least one squeezer")
    with torch.set_grad_enabled(differentiable), eval_mode(model):
        base = _probabilities(model, images)
        distances = [(base - _probabilities(model, squeeze(images))).abs().sum(dim=1) for squeeze in squeezers]
    return torch.stack(distances).amax(dim=0)


class FeatureSqueezingDetector(Detector):
    """``feature_squeezing``: :func:`feature_squeezing_score` with ``bits`` bits and a
    ``median`` x ``median`` filter (Xu et al.'s joint detector; one score per image). The
    attacker differentiates through it with BPDA for the squeezers."""

    differentiable = True

    def __init__(self, bits: int | None = 5, median: int | None = 2, estimator: str = "logistic"):
        super().__init__(estimator)
        self.bits = None if bits is None else validators.count("feature_squeezing.bits", bits)
        self.median = None if median is None else validators.count("feature_squeezing.median", median)
        if self.bits is not None and self.bits > 8:
            raise ValueError(f"feature_squeezing.bits must be a whole number in [1, 8], got {bits!r}")
        if self.bits is None and self.median is None:
            raise ValueError("feature_squeezing.bits and feature_squeezing.median are both null: nothing squeezes")

    def features(self, classifier: nn.Module, images: Tensor, probs: Tensor, index: Tensor,
                 differentiable: bool = False) -> Mapping[str, Tensor]:
        score = feature_squeezing_score(classifier, images, self.bits, self.median, differentiable=differentiable)
        return {"score": score}
