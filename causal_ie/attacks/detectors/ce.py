"""``ce``: the CE detector, on causal-effect features of every finding (:mod:`causal_ie.attacks.features`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from causal_ie.attacks.detectors.base import Detector
from causal_ie.attacks.features import LATENT_PREFIXES, CEFeatureExtractor

__all__ = ["CEDetector"]


class CEDetector(Detector):
    """CE of every finding on coarse grids of windows per intervention baseline (and a latent
    layer's cells), summarised per image by :class:`~causal_ie.attacks.features.CEFeatureExtractor`.

    Args:
        grids, baselines, outcome, nearest, latent_layer, batch_size: the extractor's.
        estimator: ``logistic`` (the adaptive attacker differentiates through it) or ``gbm``.

    With a latent layer, its pixel-space and latent features are also scored alone, as
    ``<name>_pixel`` and ``<name>_latent``.
    """

    differentiable = True
    reads_ce = True

    def __init__(
        self,
        grids: Sequence[int] = (4, 8),
        baselines: Sequence[str] = ("zero", "blur"),
        outcome: str = "logit",
        nearest: int = 3,
        latent_layer: str | None = "auto",
        batch_size: int = 256,
        estimator: str = "logistic",
    ):
        super().__init__(estimator)
        self.extractor = CEFeatureExtractor(grids, baselines, outcome, nearest, latent_layer, batch_size)

    def features(self, classifier: nn.Module, images: Tensor, probs: Tensor, index: Tensor,
                 differentiable: bool = False) -> Mapping[str, Tensor]:
        return self.extractor(classifier, images, differentiable=differentiable)

    def views(self, names: Sequence[str]) -> dict[str, list[str]]:
        latent = [n for n in names if n.startswith(LATENT_PREFIXES)]
        if not latent or len(latent) == len(names):
            return {}
        return {"pixel": [n for n in names if n not in latent], "latent": latent}
