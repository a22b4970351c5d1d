"""Summary statistics of causal-effect (CE) maps.

A CE map of finding k holds, per pixel, how much the predicted probability of
k drops when that region is intervened on; values may be negative (the
intervention *raised* the probability). Adversarial perturbations tend to
change the *shape* of these maps (how peaked, how spread out, how much
negative effect); the statistics here compare the CE maps of clean vs attacked
images (the detector's own features are in :mod:`causal_ie.attacks.features`).

Every function takes maps ``[..., H, W]`` with any leading dims and reduces the
last two. Definitions (``m`` one map, ``a = |m|``, ``p = a / sum(a)``):

* ``max_effect``: ``max(a)``;
* ``total_positive`` / ``total_negative``: ``sum(max(m, 0))`` /
  ``sum(max(-m, 0))`` (both >= 0);
* ``entropy``: Shannon entropy of ``p`` over the ``H*W`` pixels divided by
  ``log(H*W)``, in ``[0, 1]`` (1 = flat, 0 = one pixel holds everything);
* ``spread``: root of the ``p``-weighted mean squared distance of the pixel
  centres to the ``p``-weighted centroid, divided by the image diagonal
  ``sqrt(H^2 + W^2)`` so that it does not depend on resolution;
* ``topk_mass``: share of ``sum(a)`` held by the ``ceil(top_fraction*H*W)``
  largest pixels of ``a``.

An all-zero map has no distribution ``p``; its ``entropy``, ``spread`` and
``topk_mass`` are defined as 0 (like ``max_effect`` and the totals), so that a
map without any effect never produces NaN features.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

STATISTICS: tuple[str, ...] = ("max_effect", "total_positive", "total_negative", "entropy", "spread", "topk_mass")

__all__ = ["STATISTICS", "box_share", "map_correlation", "map_statistics"]


def _check_maps(maps: Tensor, name: str = "maps") -> None:
    if not isinstance(maps, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [..., H, W], got {type(maps).__name__}")
    if maps.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dims [..., H, W], got shape {tuple(maps.shape)}")
    if maps.shape[-1] == 0 or maps.shape[-2] == 0:
        raise ValueError(f"{name} must have non-empty H and W, got shape {tuple(maps.shape)}")


def _topk_count(top_fraction: float, n_pixels: int) -> int:
    """``ceil(top_fraction * n_pixels)`` in [1, n_pixels], robust to float noise (0.07*100 -> 7, not 8)."""
    return min(n_pixels, max(1, math.ceil(top_fraction * n_pixels - 1e-9)))


def map_statistics(maps: Tensor, top_fraction: float = 0.05) -> dict[str, Tensor]:
    """Every statistic of :data:`STATISTICS` per map: ``[..., H, W] -> {name: [...]}``.

    Values are float32 on the maps' device, keys in :data:`STATISTICS` order.
    See the module docstring for the definitions (all-zero maps give 0s).
    """
    _check_maps(maps)
    if not (isinstance(top_fraction, (int, float)) and 0 < top_fraction <= 1):
        raise ValueError(f"top_fraction must be a number in (0, 1], got {top_fraction!r}")
    height, width = maps.shape[-2:]
    n_pixels = height * width
    m = maps.detach().to(torch.float32).reshape(*maps.shape[:-2], n_pixels)
    a = m.abs()
    total = a.sum(-1)
    has_mass = total > 0
    # p = a / total; an all-zero map gets p = 0 everywhere, hence entropy = spread = 0
    p = a / torch.where(has_mass, total, torch.ones_like(total)).unsqueeze(-1)

    if n_pixels > 1:
        entropy = -torch.special.xlogy(p, p).sum(-1) / math.log(n_pixels)
    else:  # a single pixel: one outcome, no uncertainty
        entropy = torch.zeros_like(total)

    rows = torch.arange(height, device=m.device, dtype=torch.float32).repeat_interleave(width)
    cols = torch.arange(width, device=m.device, dtype=torch.float32).repeat(height)
    centre_r = (p * rows).sum(-1, keepdim=True)
    centre_c = (p * cols).sum(-1, keepdim=True)
    msd = (p * ((rows - centre_r) ** 2 + (cols - centre_c) ** 2)).sum(-1)
    spread = msd.clamp_min(0).sqrt() / math.hypot(height, width)

    k = _topk_count(float(top_fraction), n_pixels)
    top_sum = a.topk(k, dim=-1, sorted=False).values.sum(-1)
    topk_mass = torch.where(has_mass, top_sum / torch.where(has_mass, total, torch.ones_like(total)), 0.0)

    stats = {
        "max_effect": a.amax(-1),
        "total_positive": m.clamp_min(0).sum(-1),
        "total_negative": (-m).clamp_min(0).sum(-1),
        "entropy": entropy,
        "spread": spread,
        "topk_mass": topk_mass,
    }
    # a map with NaNs (a finding the model does not predict) has no statistics
    undefined = ~torch.isfinite(m).all(-1)
    return {name: value.masked_fill(undefined, float("nan")) for name, value in stats.items()}


def box_share(maps: Tensor, boxes: Tensor) -> Tensor:
    """Share of each map's absolute effect inside its box: ``maps [N, H, W]``, ``boxes [N, 4] -> [N]``.

    Boxes are ``(x, y, w, h)`` in pixels; pixel (r, c) is inside when its centre
    is (``x <= c + 0.5 < x + w`` and ``y <= r + 0.5 < y + h``), the convention of
    :func:`causal_ie.explain.metrics.box_masks`. NaN where the box has a NaN (no
    box) or the map is all zero (no effect to locate).
    """
    # imported here: explain.metrics pulls in torchmetrics (seconds to import), needed only for this
    from causal_ie.explain.metrics import box_masks

    _check_maps(maps)
    if maps.ndim != 3:
        raise ValueError(f"maps must be [N, H, W], got shape {tuple(maps.shape)}")
    boxes = torch.as_tensor(boxes, device=maps.device)
    if boxes.shape != (maps.shape[0], 4):
        raise ValueError(f"boxes must be [N, 4] with N={maps.shape[0]} (one per map), got shape {tuple(boxes.shape)}")
    a = maps.detach().to(torch.float32).abs()
    inside = box_masks(boxes, maps.shape[-2], maps.shape[-1]).to(a.dtype)
    total = a.sum((-2, -1))
    share = (a * inside).sum((-2, -1)) / total
    no_box = torch.isnan(boxes.to(torch.float64)).any(-1)
    return torch.where(no_box | (total == 0), torch.full_like(share, float("nan")), share)


def map_correlation(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of two maps per leading index: ``[..., H, W] x [..., H, W] -> [...]``.

    Leading dims broadcast against each other; ``H, W`` must match. NaN where
    either map is constant (zero variance: correlation is undefined).
    """
    _check_maps(a, "a")
    _check_maps(b, "b")
    if a.shape[-2:] != b.shape[-2:]:
        raise ValueError(f"a and b must have the same H, W; got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    try:
        lead = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except RuntimeError as err:
        raise ValueError(
            f"leading dims of a {tuple(a.shape)} and b {tuple(b.shape)} do not broadcast"
        ) from err
    n = a.shape[-1] * a.shape[-2]
    x = a.detach().to(torch.float32).expand(*lead, *a.shape[-2:]).reshape(*lead, n)
    y = b.detach().to(torch.float32).to(x.device).expand(*lead, *b.shape[-2:]).reshape(*lead, n)
    # constant maps by exact max == min: a centred constant map is not exactly 0 in float
    constant = (x.amax(-1) == x.amin(-1)) | (y.amax(-1) == y.amin(-1))
    x = x - x.mean(-1, keepdim=True)
    y = y - y.mean(-1, keepdim=True)
    denom = (x.square().sum(-1) * y.square().sum(-1)).sqrt()
    corr = (x * y).sum(-1) / torch.where(constant, torch.ones_like(denom), denom)
    return torch.where(constant, torch.full_like(corr, float("nan")), corr.clamp(-1.0, 1.0))
