"""Superpixel CE: SLIC segments of each image as the regions of intervention.

Segments follow image structure (ribs, heart border, lesions) instead of a
fixed grid, so one intervention removes one anatomically coherent piece.
Segments are disjoint and cover the image, so every pixel gets exactly the CE
of its own segment: the map is piecewise constant.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from skimage.segmentation import slic
from torch import Tensor, nn

from causal_ie.interventions.baselines import Baseline
from causal_ie.interventions.engine import pixel_space_effects
from causal_ie.interventions.spec import InterventionSpec


def slic_segments(x: Tensor, *, n_segments: int = 64, compactness: float = 0.1) -> Tensor:
    """SLIC label maps [N, H, W] (long, labels 0..R_n-1 without gaps) of images [N, C, H, W] in [0, 1].

    Grayscale images are segmented with ``channel_axis=None``, others with the
    channels last. ``compactness`` is small because intensities are in [0, 1]
    (skimage's default of 10 suits 0-255 Lab colours and would give a square grid).
    """
    if n_segments < 1:
        raise ValueError(f"n_segments must be >= 1, got {n_segments}")
    if compactness <= 0:
        raise ValueError(f"compactness must be > 0, got {compactness}")
    images = x.detach().to("cpu", torch.float64).numpy()
    labels = []
    for image in images:
        if image.shape[0] == 1:
            seg = slic(image[0], n_segments=n_segments, compactness=compactness, channel_axis=None, start_label=0)
        else:
            seg = slic(
                np.moveaxis(image, 0, -1),
                n_segments=n_segments,
                compactness=compactness,
                channel_axis=-1,
                start_label=0,
            )
        # relabel to 0..R-1 so every label is a non-empty region
        _, dense = np.unique(seg, return_inverse=True)
        labels.append(dense.reshape(seg.shape))
    return torch.from_numpy(np.stack(labels)).long().to(x.device)


class SegmentRegions:
    """Label maps [N, H, W] (labels 0..R_n-1) as disjoint regions, one per label."""

    def __init__(self, segments: Tensor):
        if segments.dim() != 3:
            raise ValueError(f"segments must be label maps [N, H, W], got shape {tuple(segments.shape)}")
        self.segments = segments.long()
        self.counts = [int(s.max()) + 1 for s in self.segments]

    def region_counts(self, n_images: int) -> list[int]:
        if n_images != len(self.counts):
            raise ValueError(f"{len(self.counts)} label maps for {n_images} images")
        return list(self.counts)

    def apply(
        self, inputs: Tensor, image_idx: Tensor, region_idx: Tensor, sample_idx: Tensor, baseline: Baseline
    ) -> Tensor:
        mask = (self.segments[image_idx] == region_idx[:, None, None])[:, None]
        if baseline.value is not None:
            return inputs.masked_fill_(mask, baseline.value)
        return torch.where(mask, baseline.full(image_idx, sample_idx).to(inputs.dtype), inputs)

    def assemble(self, effects: Tensor) -> Tensor:
        """Maps [N, K, H, W]: each pixel gets the effect of its segment."""
        n, k, _ = effects.shape
        height, width = self.segments.shape[-2:]
        index = self.segments.view(n, 1, height * width).expand(n, k, height * width)
        return effects.gather(2, index).view(n, k, height, width)


def superpixel_effect(
    model: nn.Module,
    x: Tensor,
    *,
    n_segments: int = 64,
    compactness: float = 0.1,
    segments: Tensor | None = None,
    spec: InterventionSpec | None = None,
    **settings: Any,
) -> tuple[Tensor, Tensor]:
    """CE maps [N, K, H, W] of removing each SLIC superpixel, and the segments [N, H, W].

    ``segments`` (label maps 0..R_n-1) replaces SLIC when given. ``spec`` and ``settings``
    as in :func:`causal_ie.interventions.causal_effect`.
    """
    spec = InterventionSpec.resolve(spec, **settings)

    def regions_for(inputs: Tensor) -> SegmentRegions:
        labels = (
            slic_segments(inputs, n_segments=n_segments, compactness=compactness)
            if segments is None
            else segments.to(inputs.device).long()
        )
        expected = (inputs.shape[0], *inputs.shape[-2:])
        if tuple(labels.shape) != expected:
            raise ValueError(f"segments must be label maps [N, H, W] = {expected}, got {tuple(labels.shape)}")
        return SegmentRegions(labels)

    effects, regions = pixel_space_effects(model, x, regions_for, spec)
    assert isinstance(regions, SegmentRegions)
    return regions.assemble(effects).to(x.device), regions.segments.to(x.device)
