"""``ce_random``: the CE detector with its window offsets and its baseline drawn per call.

A fixed grid and baseline let an adaptive attacker tune a perturbation to them; with the grid
origin and the baseline drawn per image and call, the attacker has to work in expectation over
the draws (EOT), and the defender's draw is one the attacker never saw. The defender's draws
are seeded by ``seed`` and each image's dataset index (reproducible, the same in any batch or
process); the attacker's are fresh on every call.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from causal_ie import validators
from causal_ie.attacks.detectors.base import Detector
from causal_ie.attacks.features import region_features
from causal_ie.interventions import InterventionSpec
from causal_ie.interventions.engine import pixel_space_effects
from causal_ie.interventions.windows import ShiftedWindowGrid
from causal_ie.runtime import eval_mode, to_model

__all__ = ["CERandomDetector"]


class CERandomDetector(Detector):
    """Per image: one baseline drawn from ``baselines`` and, per grid of ``grids`` windows per
    side, a grid origin drawn uniformly in [0, window) per axis (:class:`ShiftedWindowGrid`);
    then the CE detector's region features of every finding (logit effects), named by grid only
    (``g4.*``, ``g8.*``) so that every draw gives the same features."""

    differentiable = True
    randomised = True
    reads_ce = True

    def __init__(
        self,
        grids: Sequence[int] = (4, 8),
        baselines: Sequence[str] = ("zero", "blur"),
        nearest: int = 3,
        batch_size: int = 256,
        seed: int = 0,
        estimator: str = "logistic",
    ):
        super().__init__(estimator)
        if not grids:
            raise ValueError("ce_random.grids must name at least one grid (windows per side)")
        self.grids = tuple(validators.count("ce_random.grids", g) for g in grids)
        if not baselines:
            raise ValueError("ce_random.baselines must name at least one baseline")
        self.specs = {b: InterventionSpec(baseline=b, outcome="logit", batch_size=batch_size) for b in baselines}
        self.nearest = validators.count("ce_random.nearest", nearest, 0)
        self.seed = int(seed)
        self._attacker_draws = np.random.default_rng([self.seed, 1])

    def draw(self, rng: np.random.Generator, height: int, width: int) -> tuple[str, list[tuple[int, tuple[int, int]]]]:
        """(baseline, [(grid, origin)]) of one call on one image."""
        baseline = list(self.specs)[int(rng.integers(len(self.specs)))]
        shifts = []
        for grid in self.grids:
            window = (math.ceil(height / grid), math.ceil(width / grid))
            shifts.append((grid, (int(rng.integers(window[0])), int(rng.integers(window[1])))))
        return baseline, shifts

    def features(self, classifier: nn.Module, images: Tensor, probs: Tensor, index: Tensor,
                 differentiable: bool = False) -> Mapping[str, Tensor]:
        height, width = images.shape[-2:]
        names = getattr(classifier, "findings", None)
        per_image: list[dict[str, Tensor]] = []
        with eval_mode(classifier), torch.set_grad_enabled(differentiable):
            logits = classifier(to_model(classifier, images))
        for i in range(len(images)):
            rng = self._attacker_draws if differentiable else np.random.default_rng([self.seed, int(index[i])])
            baseline, shifts = self.draw(rng, height, width)
            spec = self.specs[baseline]
            if differentiable:
                spec = InterventionSpec.resolve(spec, differentiable=True)
            features: dict[str, Tensor] = {}
            for grid, origin in shifts:
                window = (math.ceil(height / grid), math.ceil(width / grid))
                effects, _ = pixel_space_effects(
                    classifier, images[i : i + 1],
                    lambda x, w=window, o=origin: ShiftedWindowGrid.shifted(tuple(x.shape[-2:]), w, o), spec,
                )
                features.update(region_features(effects, logits[i : i + 1], f"g{grid}.", self.nearest,
                                                differentiable, names))
            per_image.append(features)
        return {name: torch.cat([f[name] for f in per_image]) for name in per_image[0]}
