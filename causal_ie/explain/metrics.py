"""How good an explanation map is: localisation against lesion boxes or masks, and faithfulness.

Conventions shared by every metric here:

* a *map* is a float tensor ``[P, H, W]``, one per (image, finding) pair, larger
  meaning more important;
* a *box* is ``[P, 4]`` float ``(x, y, w, h)`` in pixels of the map's
  resolution, and pixel (row r, col c) belongs to it iff its centre does:
  ``x <= c + 0.5 < x + w`` and ``y <= r + 0.5 < y + h`` (see :func:`box_masks`);
* the ground truth may instead be pixel masks ``[P, H, W]`` (segmentations, or boxes drawn
  in another image's pixels: :mod:`causal_ie.data.ground_truth`); every localisation metric
  takes either (:func:`ground_truth_masks`), and a mask drawn from a box scores as the box.

Every metric is a torchmetrics ``Metric`` whose states are sums
(``dist_reduce_fx="sum"``): under DDP each process scores its own shard and
``compute`` adds the shards up, so the result equals a single-process run over
all pairs. ``update`` takes a whole batch of pairs at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from skimage.measure import label as label_components
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from causal_ie.data.ground_truth import box_masks
from causal_ie.interventions import InterventionSpec, MaskRegions, region_effects
from causal_ie.interventions.engine import check_images, image_forward
from causal_ie.precision import full_precision
from causal_ie.runtime import eval_mode, to_model

DEFAULT_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)

__all__ = [
    "DEFAULT_THRESHOLDS",
    "BoxLocalisation",
    "DeletionInsertion",
    "EnergyPointingGame",
    "PairCount",
    "PointingGame",
    "SegmentationIoU",
    "box_masks",
    "ground_truth_masks",
    "localisation_metrics",
]


def _check_maps_and_boxes(maps: Tensor, boxes: Tensor) -> None:
    if maps.ndim != 3:
        raise ValueError(f"maps must be [P, H, W], got shape {tuple(maps.shape)}")
    if boxes.shape != (maps.shape[0], 4) and boxes.shape != maps.shape:
        raise ValueError(
            f"ground truth must be boxes [P, 4] or masks [P, H, W] matching the maps {tuple(maps.shape)}, "
            f"got shape {tuple(boxes.shape)}"
        )


def ground_truth_masks(truth: Tensor, height: int, width: int, tolerance: float = 0) -> Tensor:
    """The ground truth of every pair as pixels [P, H, W]: boxes [P, 4] through :func:`box_masks`
    (grown by ``tolerance`` pixels on every side), masks [P, H, W] as they are (dilated so that
    a mask drawn from a box gives exactly the box grown by ``tolerance``)."""
    if truth.ndim == 2:
        t = float(tolerance)
        grow = torch.tensor([-t, -t, 2 * t, 2 * t], dtype=torch.float64, device=truth.device)
        return box_masks(truth.to(torch.float64) + grow, height, width)
    masks = truth.bool()
    if tolerance <= 0:
        return masks
    # the box [p, p + 1) of mask pixel p grown by t holds the pixels c with p - t <= c + 0.5 < p + 1 + t,
    # i.e. p - before <= c <= p + after: c is marked when a mask pixel lies in [c - after, c + before]
    before, after = math.floor(tolerance + 0.5), math.ceil(tolerance + 0.5) - 1
    padded = F.pad(masks[:, None].float(), (after, before, after, before))
    return F.max_pool2d(padded, before + after + 1, stride=1)[:, 0].bool()


class PointingGame(Metric):
    """Share of pairs whose map peaks inside the box (Zhang et al. 2016).

    Ties score the expected hit of a random tie-break: the share of the maximal
    pixels that lie in the box. A flat (e.g. all-zero) map therefore scores the
    box's share of the image, like random guessing, rather than a free hit.
    ``tolerance`` grows the box by that many pixels on every side, forgiving
    peaks just off a tight annotation.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, tolerance: float = 0, **kwargs):
        super().__init__(**kwargs)
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
        self.tolerance = float(tolerance)
        self.add_state("hits", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def pair_hits(self, maps: Tensor, boxes: Tensor) -> Tensor:
        """The hit of each pair [P] (float64: 1, 0, or the share of tied maxima in the box)."""
        _check_maps_and_boxes(maps, boxes)
        inside = ground_truth_masks(boxes.to(maps.device), maps.shape[1], maps.shape[2], self.tolerance)
        peak = maps.flatten(1).amax(dim=1)[:, None, None]
        peaks = (maps == peak).flatten(1)
        return (peaks & inside.flatten(1)).sum(dim=1).double() / peaks.sum(dim=1).clamp(min=1)

    def update(self, maps: Tensor, boxes: Tensor) -> None:
        hit = self.pair_hits(maps, boxes)
        self.hits += hit.sum().to(self.hits.device)
        self.total += maps.shape[0]

    def compute(self) -> Tensor:
        return (self.hits / self.total).float()


class EnergyPointingGame(Metric):
    """Mean share of the map's positive mass inside the box (Score-CAM, Wang et al. 2020).

    Unlike the pointing game it rewards maps that concentrate *all* their
    energy on the lesion, not just their peak. Negative values are evidence
    against the finding, not importance, so only the positive part counts; a
    map without positive mass scores 0.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("energy_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, maps: Tensor, boxes: Tensor) -> None:
        _check_maps_and_boxes(maps, boxes)
        positive = maps.to(torch.float64).clamp(min=0)
        inside = ground_truth_masks(boxes.to(maps.device), maps.shape[1], maps.shape[2])
        mass = positive.flatten(1).sum(dim=1)
        mass_inside = (positive * inside).flatten(1).sum(dim=1)
        share = torch.where(mass > 0, mass_inside / mass.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
        self.energy_sum += share.sum().to(self.energy_sum.device)
        self.total += maps.shape[0]

    def compute(self) -> Tensor:
        return (self.energy_sum / self.total).float()


def _min_max_normalised(maps: Tensor) -> Tensor:
    """Each map [P, H, W] scaled to [0, 1]; a constant map becomes all ones (the whole image)."""
    low = maps.flatten(1).amin(dim=1)[:, None, None]
    span = maps.flatten(1).amax(dim=1)[:, None, None] - low
    return torch.where(span > 0, (maps - low) / span.clamp(min=torch.finfo(maps.dtype).tiny), 1.0)


def _largest_component_box(binary: np.ndarray) -> tuple[int, int, int, int]:
    """``(row0, row1, col0, col1)`` (inclusive) bounding the largest 8-connected component.

    Equal-sized components: the first in raster order (skimage's label order).
    """
    labels = label_components(binary, connectivity=2)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0  # background
    rows, cols = np.nonzero(labels == int(sizes.argmax()))
    return int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())


class BoxLocalisation(Metric):
    """Box accuracy of the ChestX-ray8 protocol (Wang et al. 2017).

    Per pair the map is min-max normalised and binarised at ``map_threshold``
    (pixels ``>=`` it); the predicted box bounds the largest 8-connected
    component (a constant map binarises to the whole image). Against the
    ground-truth box (as pixel sets, :func:`box_masks`) we take IoU and
    IoBB = |pred ∩ gt| / |pred|, the latter forgiving a predicted box that
    sits inside a loose annotation. For each T the accuracy is the share of
    pairs with IoU > T (``iou@T``) and IoBB > T (``iobb@T``), strictly
    greater as in the paper; ``iou_mean``/``iobb_mean`` average the raw values.

    Connected components need skimage, i.e. the CPU; the overlaps are
    exact integer counts compared in float64, so a ratio exactly equal to T
    is never counted as above it by rounding.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
        map_threshold: float = 0.5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.thresholds = tuple(float(t) for t in thresholds)
        if not self.thresholds:
            raise ValueError("BoxLocalisation needs at least one IoU/IoBB threshold")
        if not 0.0 <= map_threshold <= 1.0:
            raise ValueError(
                f"map_threshold must be in [0, 1] (maps are min-max normalised), got {map_threshold}"
            )
        self.map_threshold = float(map_threshold)
        n = len(self.thresholds)
        self.add_state("iou_hits", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("iobb_hits", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("iou_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("iobb_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def predicted_masks(self, maps: Tensor) -> Tensor:
        """The predicted box of every map as a bool pixel mask ``[P, H, W]`` (on the CPU)."""
        maps = maps.detach().to("cpu", torch.float64)
        binary = (_min_max_normalised(maps) >= self.map_threshold).numpy()
        pred = torch.zeros(maps.shape, dtype=torch.bool)
        for p in range(maps.shape[0]):
            r0, r1, c0, c1 = _largest_component_box(binary[p])
            pred[p, r0 : r1 + 1, c0 : c1 + 1] = True
        return pred

    def pair_overlaps(self, maps: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        """(IoU [P], IoBB [P]) of each pair's predicted box with its lesion box (float64, CPU)."""
        _check_maps_and_boxes(maps, boxes)
        pred = self.predicted_masks(maps)
        gt = ground_truth_masks(boxes.detach().cpu(), maps.shape[1], maps.shape[2])
        inter = (pred & gt).flatten(1).sum(dim=1).double()
        union = (pred | gt).flatten(1).sum(dim=1).double()
        pred_area = pred.flatten(1).sum(dim=1).double()  # >= 1: the peak is always in
        return inter / union, inter / pred_area

    def update(self, maps: Tensor, boxes: Tensor) -> None:
        iou, iobb = self.pair_overlaps(maps, boxes)
        thresholds = torch.tensor(self.thresholds, dtype=torch.float64)
        device = self.total.device
        self.iou_hits += (iou[:, None] > thresholds).sum(dim=0).to(device)
        self.iobb_hits += (iobb[:, None] > thresholds).sum(dim=0).to(device)
        self.iou_sum += iou.sum().to(device)
        self.iobb_sum += iobb.sum().to(device)
        self.total += maps.shape[0]

    def compute(self) -> dict[str, Tensor]:
        total = self.total.double()
        result: dict[str, Tensor] = {}
        for i, t in enumerate(self.thresholds):
            result[f"iobb@{t:g}"] = (self.iobb_hits[i] / total).float()
        for i, t in enumerate(self.thresholds):
            result[f"iou@{t:g}"] = (self.iou_hits[i] / total).float()
        result["iobb_mean"] = (self.iobb_sum / total).float()
        result["iou_mean"] = (self.iou_sum / total).float()
        return result


class SegmentationIoU(Metric):
    """Mean IoU of the binarised map with the ground-truth pixels, as CheXlocalize's mIoU
    (Saporta et al. 2022): per pair the map is min-max normalised and its pixels ``>=``
    ``map_threshold`` are the predicted segmentation (no box around them, unlike
    :class:`BoxLocalisation`); a constant map predicts the whole image. CheXlocalize's hit rate
    is the pointing game with no tolerance (:class:`PointingGame`)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, map_threshold: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= map_threshold <= 1.0:
            raise ValueError(f"map_threshold must be in [0, 1] (maps are min-max normalised), got {map_threshold}")
        self.map_threshold = float(map_threshold)
        self.add_state("iou_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def pair_ious(self, maps: Tensor, truth: Tensor) -> Tensor:
        """IoU [P] (float64) of each pair's binarised map with its ground truth."""
        _check_maps_and_boxes(maps, truth)
        maps = maps.detach().to(torch.float64)
        pred = _min_max_normalised(maps) >= self.map_threshold
        gt = ground_truth_masks(truth.to(maps.device), maps.shape[1], maps.shape[2])
        inter = (pred & gt).flatten(1).sum(dim=1).double()
        return inter / (pred | gt).flatten(1).sum(dim=1).double()  # >= 1: the peak is predicted

    def update(self, maps: Tensor, truth: Tensor) -> None:
        self.iou_sum += self.pair_ious(maps, truth).sum().to(self.iou_sum.device)
        self.total += maps.shape[0]

    def compute(self) -> Tensor:
        return (self.iou_sum / self.total).float()


class PairCount(Metric):
    """How many (map, box) pairs were scored, summed over processes.

    Reported beside the rates so a reader can tell 0.5 of 2 pairs from 0.5 of 2000.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, maps: Tensor, boxes: Tensor | None = None) -> None:
        self.total += maps.shape[0]

    def compute(self) -> Tensor:
        return self.total.clone()


def localisation_metrics(
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    map_threshold: float = 0.5,
    tolerance: float = 0,
) -> MetricCollection:
    """All localisation scores of one explainer, behind one ``update(maps, boxes)``.

    ``compute()`` gives a flat dict: ``pointing_game``, ``energy_pointing_game``,
    ``iobb@T``/``iou@T`` for each threshold, ``iobb_mean``, ``iou_mean`` and
    ``pairs``. Compute groups are off: the metrics share no states.
    """
    return MetricCollection(
        {
            "pointing_game": PointingGame(tolerance=tolerance),
            "energy_pointing_game": EnergyPointingGame(),
            "box": BoxLocalisation(thresholds=thresholds, map_threshold=map_threshold),
            "pairs": PairCount(),
        },
        compute_groups=False,
    )


class DeletionInsertion(Metric):
    """Faithfulness as deletion and insertion AUC (RISE, Petsiuk et al. 2018).

    Pixels are ranked by the map (descending; stable, so ties keep raster
    order). At steps s = 0..n_steps the first ``round(s * H * W / n_steps)``
    pixels are *deleted* (set to the intervention's baseline, by default the
    blurred image) from the image, or *inserted* (copied from the image) into
    the baseline, and the classifier's probability of the pair's finding is
    recorded. The AUC is the trapezoidal area under probability vs. the
    fraction of pixels changed, from 0 to 1. A faithful map has low deletion
    AUC (the probability collapses once its top pixels are gone) and high
    insertion AUC.

    Both curves are interventions: step s of deletion is do(X_top = b), step s
    of insertion do(X_rest = b), so they run on the CE engine
    (:func:`~causal_ie.interventions.region_effects` with :class:`~causal_ie.interventions.MaskRegions`)
    with ``intervention``
    (default: the ``blur`` baseline in batches of 128; its outcome must be
    ``prob``), all findings per forward, without gradients.

    The classifier is held outside the module tree: the evaluating
    LightningModule owns it, and registering it here would duplicate its
    weights in this metric's ``state_dict`` and move it with the metric.
    """

    is_differentiable = False
    higher_is_better = None  # lower deletion, higher insertion
    full_state_update = False

    def __init__(
        self, classifier: nn.Module, n_steps: int = 10, intervention: InterventionSpec | None = None, **kwargs
    ):
        super().__init__(**kwargs)
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        intervention = intervention or InterventionSpec(baseline="blur", batch_size=128)
        if intervention.outcome != "prob":
            raise ValueError(
                f"deletion/insertion curves follow the finding's probability: their intervention needs "
                f"outcome='prob', got {intervention.outcome!r}"
            )
        self._classifier = [classifier]  # a list: not a submodule (see class docstring)
        self.n_steps = int(n_steps)
        self.intervention = intervention
        self.add_state("deletion_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("insertion_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    @property
    def classifier(self) -> nn.Module:
        return self._classifier[0]

    def pixel_counts(self, num_pixels: int) -> list[int]:
        """Pixels changed at each step: ``round(s * num_pixels / n_steps)``, s = 0..n_steps."""
        return [round(s * num_pixels / self.n_steps) for s in range(self.n_steps + 1)]

    def curves(self, images: Tensor, maps: Tensor, finding_idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(fractions [S+1], deletion [P, S+1], insertion [P, S+1])`` probability curves."""
        num_pairs, _, height, width = images.shape
        if maps.shape != (num_pairs, height, width):
            raise ValueError(
                f"maps must be [P, H, W] = {(num_pairs, height, width)} to match images "
                f"{tuple(images.shape)}, got {tuple(maps.shape)}"
            )
        if finding_idx.shape != (num_pairs,):
            raise ValueError(f"finding_idx must be [P] with P={num_pairs}, got {tuple(finding_idx.shape)}")
        device = images.device
        order = torch.argsort(maps.detach().to(device).flatten(1), dim=1, descending=True, stable=True)
        # rank[p, i]: position of pixel i in pair p's order (0 = most important)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(height * width, device=device).expand_as(order))
        counts = torch.tensor(self.pixel_counts(height * width), device=device)
        top = rank[:, None, :] < counts[None, :, None]  # [P, S+1, H*W]: the pixels changed at step s
        # deletion sets the top pixels to the baseline; insertion keeps them and sets the rest
        masks = torch.cat([top, ~top], dim=1).view(num_pairs, -1, height, width)
        check_images(images, "images")
        inputs = to_model(self.classifier, images.detach())
        # a measurement: float32 even inside a bf16/fp16-mixed test step (see causal_ie.precision)
        with eval_mode(self.classifier), torch.no_grad(), full_precision(inputs.device):
            effects, probs = region_effects(
                image_forward(self.classifier), inputs, MaskRegions(masks.to(inputs.device), num_pairs),
                self.intervention.baseline_for(inputs), self.intervention, with_reference=True,
            )
        rows = torch.arange(num_pairs, device=effects.device)
        finding_idx = finding_idx.to(effects.device)
        # CE = y(x) - y(do(X_R = b)), so y(do(X_R = b)) = y(x) - CE
        curves = (probs[rows, finding_idx, None] - effects[rows, finding_idx]).double()
        deletion, insertion = curves.split(self.n_steps + 1, dim=1)
        fractions = counts.double() / (height * width)
        return fractions.to(curves.device), deletion, insertion

    def update(self, images: Tensor, maps: Tensor, finding_idx: Tensor) -> None:
        fractions, deletion, insertion = self.curves(images, maps, finding_idx)
        device = self.total.device
        self.deletion_sum += torch.trapezoid(deletion, fractions, dim=1).sum().to(device)
        self.insertion_sum += torch.trapezoid(insertion, fractions, dim=1).sum().to(device)
        self.total += images.shape[0]

    def compute(self) -> dict[str, Tensor]:
        return {
            "deletion_auc": (self.deletion_sum / self.total).float(),
            "insertion_auc": (self.insertion_sum / self.total).float(),
        }
