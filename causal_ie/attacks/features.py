"""Detector features from causal effects: what the CE of every finding says about an image.

An adversarial perturbation moves some finding's logit across the decision
threshold with a tiny, spread-out change. Interventions on the attacked image
then behave unlike those on a clean one: the attacked finding sits near the
threshold, so removing almost any region flips it, and its effects no longer
concentrate on one region. The features here describe that for every finding,
without knowing which one was attacked:

- per finding k, from its effects on R regions (``E[n, k, r] = z_k(x) -
  z_k(do(X_r = b))``, logits): the largest effect (``max``), the largest negative
  one (``min``: a region whose removal raises the finding), the mean ``|E|``
  (``l1``) and the share of regions whose removal flips the prediction at
  threshold 0 (``flip``);
- the same for the ``nearest`` findings closest to the threshold (smallest
  ``|z_k|``, in that order, plus ``|z_k|`` itself): the attacked finding without
  knowing it;
- summaries over findings: mean and max flip share, mean ``l1``, largest
  ``max`` and smallest ``min``, and how concentrated the effects are in space
  (normalised entropy of the summed ``|E|`` over regions).

:class:`CEFeatureExtractor` computes them from CE on windows (sliding windows of a size and
stride, as the ``mask`` config's, and/or coarse tilings, ``grids``: windows per side) for each
intervention baseline, optionally on a
latent layer's cells, and the agreement of pixel and latent CE. Findings a
classifier does not predict (NaN logits) are left out of every summary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from causal_ie.attacks.adaptive import straight_through_flip
from causal_ie.interventions import InterventionSpec, latent_effect
from causal_ie.interventions.engine import pixel_space_effects
from causal_ie.interventions.windows import WindowGrid
from causal_ie.runtime import eval_mode, to_model

PER_FINDING = ("max", "min", "l1", "flip")
# the names of the features that read the latent layer (the rest read pixel-space CE)
LATENT_PREFIXES = ("latent.", "agreement.")


def region_features(
    effects: Tensor, logits: Tensor, prefix: str, nearest: int = 3, differentiable: bool = False,
    names: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """Features [N] of effects [N, K, R] on logits [N, K] (see the module docstring); names
    start with ``prefix`` and name the findings by ``names`` (the model's labels; default
    their indices). NaN logits (findings the model does not predict) are left out.
    ``differentiable``: the flip shares get the gradient of a sigmoid surrogate (BPDA), for an
    attacker who differentiates through the detector; their values are unchanged."""
    n, k, r = effects.shape
    if logits.shape != (n, k):
        raise ValueError(f"logits must be [N, K] = {(n, k)} to match effects {tuple(effects.shape)}")
    known = torch.isfinite(logits)  # [N, K]
    after = logits[..., None] - effects
    if differentiable:
        flip = straight_through_flip(logits[..., None], after).mean(-1)
    else:
        flip = ((after > 0) != (logits[..., None] > 0)).to(effects.dtype).mean(-1)
    per = {
        "max": effects.amax(-1),
        "min": effects.amin(-1),
        "l1": effects.abs().mean(-1),
        "flip": flip,
    }
    names = tuple(str(i) for i in range(k)) if names is None or len(names) != k else tuple(names)
    features: dict[str, Tensor] = {}
    for stat, values in per.items():
        for j, name in enumerate(names):
            features[f"{prefix}{name}.{stat}"] = values[:, j]
    # the findings nearest the threshold, in order of |z|
    distance = logits.abs().masked_fill(~known, float("inf"))
    order = distance.argsort(dim=1)[:, :nearest]
    for rank in range(min(nearest, k)):
        idx = order[:, rank : rank + 1]
        features[f"{prefix}nearest{rank}.abs_logit"] = distance.gather(1, idx).squeeze(1)
        for stat, values in per.items():
            features[f"{prefix}nearest{rank}.{stat}"] = values.gather(1, idx).squeeze(1)
    masked = {stat: values.masked_fill(~known, float("nan")) for stat, values in per.items()}
    features[f"{prefix}flip.mean"] = masked["flip"].nanmean(1)
    features[f"{prefix}flip.max"] = masked["flip"].nan_to_num(-1.0).amax(1)
    features[f"{prefix}l1.mean"] = masked["l1"].nanmean(1)
    features[f"{prefix}max.max"] = masked["max"].nan_to_num(float("-inf")).amax(1)
    features[f"{prefix}min.min"] = masked["min"].nan_to_num(float("inf")).amin(1)
    mass = effects.abs().masked_fill(~known[..., None], 0.0).sum(1)  # [N, R]
    share = mass / mass.sum(-1, keepdim=True).clamp_min(torch.finfo(mass.dtype).tiny)
    entropy = -torch.special.xlogy(share, share).sum(-1) / math.log(r) if r > 1 else share.new_zeros(n)
    features[f"{prefix}spatial_entropy"] = entropy
    return features


def agreement(pixel: Tensor, latent: Tensor, logits: Tensor) -> Tensor:
    """Mean over the predicted findings of the Pearson correlation between pixel-space and
    latent effects on the same cells ([N, K, R] each): clean images' two views agree."""
    x = pixel - pixel.mean(-1, keepdim=True)
    y = latent - latent.mean(-1, keepdim=True)
    denom = (x.square().sum(-1) * y.square().sum(-1)).sqrt()
    corr = (x * y).sum(-1) / denom.clamp_min(torch.finfo(x.dtype).tiny)
    corr = corr.masked_fill((denom == 0) | ~torch.isfinite(logits), float("nan"))
    return corr.nanmean(1)


class CEFeatureExtractor:
    """Detector features of images from the CE of every finding (``detection.detectors.ce``).

    Args:
        grids: windows per image side; each grid's windows tile the image (stride = window).
        windows: sliding windows as (size, stride) pairs in pixels, e.g. the mask's.
        baselines: intervention baselines, e.g. ``zero`` and the content-preserving ``blur``.
        outcome: what effects are measured on (``logit`` by default: probability effects
            scale with p(1-p) and so partly re-encode confidence).
        nearest: how many findings nearest the threshold get their own features.
        latent_layer: a layer whose cells are intervened on too (``auto``: a mid-level one;
            null: none); its grid gives the agreement of pixel and latent CE.
        batch_size: perturbed images per forward.
    """

    def __init__(
        self,
        grids: Sequence[int] = (4, 8),
        windows: Sequence[Sequence[int]] = (),
        baselines: Sequence[str] = ("zero", "blur"),
        outcome: str = "logit",
        nearest: int = 3,
        latent_layer: str | None = "auto",
        batch_size: int = 256,
    ):
        grids, windows = tuple(grids or ()), tuple(tuple(int(v) for v in w) for w in (windows or ()))
        if any(int(g) < 1 for g in grids):
            raise ValueError(f"detection.detectors.ce.grids must be windows per side >= 1, got {list(grids)}")
        if any(len(w) != 2 or min(w) < 1 for w in windows):
            raise ValueError(f"detection.detectors.ce windows must be (size, stride) pairs >= 1 px, got {list(windows)}")
        if not grids and not windows:
            raise ValueError("detection.detectors.ce needs windows: set its grids or a window size")
        self.windows = windows
        if not baselines:
            raise ValueError("detection.detectors.ce.baselines must name at least one baseline")
        self.grids, self.baselines = tuple(int(g) for g in grids), tuple(baselines)
        self.specs = {b: InterventionSpec(baseline=b, outcome=outcome, batch_size=batch_size) for b in self.baselines}
        self.outcome, self.nearest, self.latent_layer = outcome, int(nearest), latent_layer
        self.batch_size = batch_size

    def placements(self, size: tuple[int, int]) -> dict[str, WindowGrid]:
        """The window grids on an image of ``size``: ``g<grid>`` tilings and ``w<size>s<stride>`` sliding windows."""
        height, width = size
        out = {f"g{g}": WindowGrid.create(size, (math.ceil(height / g), math.ceil(width / g)),
                                          (math.ceil(height / g), math.ceil(width / g))) for g in self.grids}
        for window, stride in self.windows:
            out[f"w{window}s{stride}"] = WindowGrid.create(size, (min(window, height), min(window, width)), stride)
        return out

    def effects(self, model: nn.Module, images: Tensor, differentiable: bool = False) -> dict[str, Tensor]:
        """Effects [N, K, R] per view: ``g<grid>_<baseline>`` and, with a latent layer, ``latent``."""
        views: dict[str, Tensor] = {}
        for name, grid in self.placements(tuple(images.shape[-2:])).items():
            for baseline, spec in self.specs.items():
                if differentiable:
                    spec = InterventionSpec.resolve(spec, differentiable=True)
                effects, _ = pixel_space_effects(model, images, lambda x, g=grid: g, spec)
                views[f"{name}_{baseline}"] = effects
        if self.latent_layer:
            latent = latent_effect(
                model, images, layer=self.latent_layer, outcome=self.outcome, batch_size=self.batch_size,
                differentiable=differentiable,
            )
            views["latent"] = latent.flatten(2)
        return views

    def __call__(self, model: nn.Module, images: Tensor, differentiable: bool = False) -> dict[str, Tensor]:
        """Features {name: [N]} of ``images`` (from their own effects only: no clean reference)."""
        with eval_mode(model), torch.set_grad_enabled(differentiable):
            logits = model(to_model(model, images))
        if self.outcome != "logit":
            raise ValueError(f"detection.detectors.ce.outcome={self.outcome!r}: the flip features need logit effects")
        views = self.effects(model, images, differentiable)
        features: dict[str, Tensor] = {}
        for name, effects in views.items():
            features.update(region_features(effects, logits, f"{name}.", self.nearest, differentiable,
                                            getattr(model, "findings", None)))
        if "latent" in views:
            latent = views["latent"]
            cells = round(math.sqrt(latent.shape[-1]))
            pixel_name = next(iter(v for v in views if v != "latent"))
            pixel = views[pixel_name]
            rows, cols = self.placements(tuple(images.shape[-2:]))[pixel_name.rsplit("_", 1)[0]].shape
            n, k = pixel.shape[:2]
            resized = F.interpolate(pixel.reshape(n * k, 1, rows, cols), size=(cells, cells), mode="area")
            features["agreement.pixel_latent"] = agreement(resized.reshape(n, k, -1), latent, logits)
        return features
