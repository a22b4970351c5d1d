"""Boxes (row0, row1, col0, col1), end-exclusive, of the pixels an intervention may change."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def changed_boxes(perturbed: Tensor, clean: Tensor) -> Tensor:
    """Bounding boxes [B, 4] of the pixels (any channel) where ``perturbed`` [B, C, H, W] differs from
    ``clean`` (same shape, or [1, C, H, W] for all); (0, 0, 0, 0) where nothing changed."""
    return mask_boxes((perturbed != clean).any(dim=1))


def window_boxes(grid: Any, window_idx: Tensor) -> Tensor:
    """Boxes [B, 4] (row0, row1, col0, col1) of windows ``window_idx`` of a
    :class:`~causal_ie.interventions.windows.WindowGrid` (clipped at the image border)."""
    height, width = grid.image_size
    n_cols = grid.shape[1]
    idx = window_idx.to("cpu", torch.long)
    top = (idx // n_cols) * grid.stride[0]
    left = (idx % n_cols) * grid.stride[1]
    return torch.stack(
        [top, (top + grid.window[0]).clamp(max=height), left, (left + grid.window[1]).clamp(max=width)], dim=1
    )


def mask_boxes(masks: Tensor) -> Tensor:
    """Bounding boxes [..., 4] (row0, row1, col0, col1) of boolean masks [..., H, W]; empty masks get
    (0, 0, 0, 0)."""
    masks = masks.bool()
    rows, cols = masks.any(dim=-1), masks.any(dim=-2)
    height, width = masks.shape[-2:]

    def span(hit: Tensor, size: int) -> tuple[Tensor, Tensor]:
        ar = torch.arange(size, device=hit.device)
        first = torch.where(hit, ar, size).amin(dim=-1)
        last = torch.where(hit, ar + 1, 0).amax(dim=-1)
        empty = ~hit.any(dim=-1)
        return first.masked_fill(empty, 0), last.masked_fill(empty, 0)

    r0, r1 = span(rows, height)
    c0, c1 = span(cols, width)
    return torch.stack([r0, r1, c0, c1], dim=-1).cpu()
