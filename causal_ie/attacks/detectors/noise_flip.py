"""``noise_flip``: attacked inputs sit near a decision boundary, so small Gaussian noise moves
their predictions more than a clean image's."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from causal_ie import validators
from causal_ie.attacks.detectors.base import Detector

__all__ = ["NoiseFlipDetector", "prediction_change_under_noise"]


def prediction_change_under_noise(
    model: torch.nn.Module,
    images: Tensor,
    std: float = 0.01,
    draws: int = 4,
    seed: int | Sequence[int] = 0,
    differentiable: bool = False,
) -> Tensor:
    """The ``noise_flip`` baseline score ``[N]``: how much Gaussian noise moves the predictions.

    ``seed`` may be one integer per image: then each image's noise is the same
    whichever batch (or DDP process) it lands in.

    Mean over ``draws`` draws of ``N(0, std^2)`` pixel noise (``[0, 1]`` units;
    the noisy image is clamped to ``[0, 1]``; noise from a ``torch.Generator``
    on the images' device seeded with ``seed``) of the mean absolute change of
    the sigmoid probabilities over the findings (NaN ones, which the model does not
    predict, left out), relative to the prediction on
    ``images`` as given. ``model`` maps ``[N, C, H, W]`` images to logits
    ``[N, K]`` and is used in its current mode (call ``model.eval()`` first).
    ``differentiable``: the score keeps its autograd graph (the noise is a constant).
    """
    if not std >= 0:
        raise ValueError(f"std must be >= 0, got {std!r}")
    if int(draws) != draws or draws < 1:
        raise ValueError(f"draws must be an integer >= 1, got {draws!r}")
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    n, draws = images.shape[0], int(draws)
    if isinstance(seed, int):
        generator = torch.Generator(device=images.device).manual_seed(seed)
        noise = torch.randn((draws, *images.shape), generator=generator, device=images.device, dtype=images.dtype)
    else:
        if len(seed) != n:
            raise ValueError(f"seed: one per image expected ({n}), got {len(seed)}")
        noise = torch.stack(
            [
                torch.randn(
                    (draws, *images.shape[1:]),
                    generator=torch.Generator(device=images.device).manual_seed(int(s)),
                    device=images.device,
                    dtype=images.dtype,
                )
                for s in seed
            ],
            dim=1,
        )
    with torch.set_grad_enabled(differentiable):
        base = torch.sigmoid(model(images).reshape(n, -1).float())
        total = torch.zeros(n, device=base.device)
        for d in range(draws):
            noisy = (images + std * noise[d]).clamp(0.0, 1.0)
            probs = torch.sigmoid(model(noisy).reshape(n, -1).float())
            total += (probs - base).abs().nanmean(dim=1)
    return total / draws


class NoiseFlipDetector(Detector):
    """``noise_flip``: :func:`prediction_change_under_noise` with ``draws`` draws of N(0, ``std``^2)
    pixel noise, seeded per image by ``seed`` + its dataset index (the same noise in any batch
    or process)."""

    differentiable = True
    randomised = True

    def __init__(self, std: float = 0.01, draws: int = 4, seed: int = 0, estimator: str = "logistic"):
        super().__init__(estimator)
        self.std = validators.number("noise_flip.std", std, 0.0)
        self.draws = validators.count("noise_flip.draws", draws)
        self.seed = int(seed)
        # the attacker's calls get fresh noise each time (it cannot know the defender's draws)
        self._attacker_draws = np.random.default_rng(self.seed + 1)

    def features(self, classifier: nn.Module, images: Tensor, probs: Tensor, index: Tensor,
                 differentiable: bool = False) -> Mapping[str, Tensor]:
        if differentiable:
            seed: int | list[int] = int(self._attacker_draws.integers(2**62))
        else:
            seed = [self.seed + int(i) for i in index.tolist()]
        score = prediction_change_under_noise(classifier, images, std=self.std, draws=self.draws, seed=seed,
                                              differentiable=differentiable)
        return {"score": score}
