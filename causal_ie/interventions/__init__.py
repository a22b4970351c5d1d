"""Interventions do(X_R = b) and their causal effects on all findings of a classifier.

- :func:`causal_effect`: sliding-window CE maps (Captum ``Occlusion``'s placement);
- :func:`superpixel_effect`: CE of SLIC superpixels;
- :func:`mask_effect`: CE of arbitrary binary masks;
- :func:`latent_effect`: CE of interventions on a feature map
  inside the network (:class:`LatentSplit` cuts the network with torch.fx);
  :func:`autoencoder_space`: the same through a trained autoencoder's bottleneck.

``engine`` runs any family of regions in batches; ``windows``, ``superpixel`` and
``latent`` define the regions; ``baselines`` what a region is replaced by;
``spec`` (:class:`InterventionSpec`) the options every entry point shares, with
:class:`EngineSettings` (how forwards run: ``fast``); ``approx`` the opt-in approximate tier.
"""

from causal_ie.interventions.autoencoder import (
    ActivationAutoencoder,
    AutoencoderSettings,
    AutoencoderSpace,
    autoencoder_space,
    total_variation,
    train_autoencoder,
)
from causal_ie.interventions.baselines import BASELINES, Baseline, blur, make_baseline
from causal_ie.interventions.engine import (
    MaskRegions,
    Regions,
    causal_effect,
    mask_effect,
    outcome_effect,
    outcome_values,
    region_effects,
)
from causal_ie.interventions.latent import (
    LatentSpace,
    LatentSplit,
    auto_layer,
    latent_effect,
    latent_split,
    resolve_layer,
)
from causal_ie.interventions.spec import OUTCOMES, EngineSettings, InterventionSpec
from causal_ie.interventions.superpixel import SegmentRegions, slic_segments, superpixel_effect
from causal_ie.interventions.windows import WindowGrid, window_offsets

__all__ = [
    "BASELINES",
    "EngineSettings",
    "OUTCOMES",
    "ActivationAutoencoder",
    "AutoencoderSettings",
    "AutoencoderSpace",
    "Baseline",
    "InterventionSpec",
    "LatentSpace",
    "LatentSplit",
    "MaskRegions",
    "Regions",
    "SegmentRegions",
    "WindowGrid",
    "auto_layer",
    "autoencoder_space",
    "blur",
    "causal_effect",
    "latent_effect",
    "latent_split",
    "make_baseline",
    "mask_effect",
    "outcome_effect",
    "outcome_values",
    "region_effects",
    "resolve_layer",
    "slic_segments",
    "superpixel_effect",
    "total_variation",
    "train_autoencoder",
    "window_offsets",
]
