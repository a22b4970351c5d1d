"""``ce``: the CE detector, on causal-effect features of every finding (:mod:`causal_ie.attacks.features`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from causal_ie.attacks.detectors.base import Detector
from causal_ie.attacks.features import LATENT_PREFIXES, CEFeatureExtractor

log = logging.getLogger(__name__)

__all__ = ["CEDetector"]


# the coarse tilings of a detector whose mask has no window size (superpixel, latent)
FALLBACK_GRIDS = (4, 8)


class CEDetector(Detector):
    """CE of every finding on windows per intervention baseline (and a latent layer's cells),
    summarised per image by :class:`~causal_ie.attacks.features.CEFeatureExtractor`.

    Args:
        window, stride: sliding windows in pixels; the config takes the ``mask``'s
            (``mask.size``, ``mask.stride``), so a mask-size sweep changes what the detector
            reads too. None: no sliding windows.
        grids: coarse tilings (windows per side), instead of or beside the windows. With
            neither (a mask without a window size, e.g. superpixels): grids 4 and 8.
        baselines, outcome, nearest, latent_layer, batch_size: the extractor's.
        estimator: ``logistic`` (the adaptive attacker differentiates through it) or ``gbm``.

    With a latent layer, its pixel-space and latent features are also scored alone, as
    ``<name>_pixel`` and ``<name>_latent``.
    """

    differentiable = True
    reads_ce = True

    def __init__(
        self,
        window: int | None = None,
        stride: int | None = None,
        grids: Sequence[int] | None = None,
        baselines: Sequence[str] = ("zero", "blur"),
        outcome: str = "logit",
        nearest: int = 3,
        latent_layer: str | None = "auto",
        batch_size: int = 256,
        estimator: str = "logistic",
    ):
        super().__init__(estimator)
        windows = [] if window is None else [(int(window), int(stride or window))]
        if not grids and not windows:
            log.info("the CE detector reads grids %s: the mask has no window size", FALLBACK_GRIDS)
            grids = FALLBACK_GRIDS
        self.extractor = CEFeatureExtractor(grids or (), windows, baselines, outcome, nearest, latent_layer, batch_size)

    def features(self, classifier: nn.Module, images: Tensor, probs: Tensor, index: Tensor,
                 differentiable: bool = False) -> Mapping[str, Tensor]:
        return self.extractor(classifier, images, differentiable=differentiable)

    def views(self, names: Sequence[str]) -> dict[str, list[str]]:
        latent = [n for n in names if n.startswith(LATENT_PREFIXES)]
        if not latent or len(latent) == len(names):
            return {}
        return {"pixel": [n for n in names if n not in latent], "latent": latent}
