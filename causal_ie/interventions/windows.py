"""Sliding windows: where they go, how a batch of them is applied, how effects become maps.

Placement follows Captum's ``Occlusion`` exactly, so the two give the same maps:
along each axis a window of size ``w`` with stride ``s`` starts at
``0, s, 2s, ..., ceil((H - w) / s) * s``. When ``(H - w)`` is not a multiple of
``s`` the last window sticks out of the image and is *clipped* to it (it covers
only ``H - offset`` rows). Every pixel is therefore covered when ``s <= w``;
only a stride larger than the window (which Captum refuses) leaves gaps, and
pixels no window covers get 0.

Applying a window never builds a float mask: the window's pixels are listed as
flat indices (clipped windows repeat their last row/column, which is harmless
since it is written with the same value) and written with one ``scatter_`` for
the whole batch. Effects of a grid of windows become a map with
``torch.nn.functional.fold``: each window adds its effect to the pixels it
covers, and the sum is divided by the number of windows covering each pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from causal_ie.interventions.baselines import Baseline

# fold materialises [N*K, window area, windows] values: at most this many at once
_FOLD_CHUNK_ELEMENTS = 1 << 24


def pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    """``value`` as (height, width) of positive ints, or a ValueError naming ``name``."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int or an (h, w) pair of ints >= 1, got {value!r}")
    if isinstance(value, int):
        value = (value, value)
    try:
        h, w = value  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or an (h, w) pair of ints >= 1, got {value!r}") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (h, w)):
        raise ValueError(f"{name} must be an int or an (h, w) pair of ints >= 1, got {value!r}")
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return int(h), int(w)


def window_offsets(size: int, window: int, stride: int) -> list[int]:
    """Start offsets along one axis (Captum's placement; see the module docstring)."""
    steps = math.ceil((size - window) / stride) + 1
    return [i * stride for i in range(steps) if i * stride < size]


@dataclass(frozen=True)
class WindowGrid:
    """All windows of size ``window`` and ``stride`` on an ``image_size`` image, row-major."""

    image_size: tuple[int, int]
    window: tuple[int, int]
    stride: tuple[int, int]

    @classmethod
    def create(
        cls,
        image_size: tuple[int, int],
        window: int | tuple[int, int],
        stride: int | tuple[int, int],
    ) -> WindowGrid:
        """Validated grid; ValueError for a window larger than the image or sizes < 1."""
        win, step = pair(window, "window"), pair(stride, "stride")
        height, width = int(image_size[0]), int(image_size[1])
        if win[0] > height or win[1] > width:
            raise ValueError(f"window {win} is larger than the image ({height}, {width})")
        return cls((height, width), win, step)

    @property
    def rows(self) -> list[int]:
        return window_offsets(self.image_size[0], self.window[0], self.stride[0])

    @property
    def cols(self) -> list[int]:
        return window_offsets(self.image_size[1], self.window[1], self.stride[1])

    @property
    def shape(self) -> tuple[int, int]:
        """Windows per column and per row."""
        return len(self.rows), len(self.cols)

    def __len__(self) -> int:
        n_rows, n_cols = self.shape
        return n_rows * n_cols

    def region_counts(self, n_images: int) -> list[int]:
        """Every image has the same windows (the engine's ``Regions`` protocol)."""
        return [len(self)] * n_images

    def pixel_index(self, window_idx: Tensor) -> Tensor:
        """Flat pixel indices [B, wh*ww] covered by windows ``window_idx`` [B] (clipped at the border)."""
        height, width = self.image_size
        n_cols = self.shape[1]
        device = window_idx.device
        top = (window_idx // n_cols) * self.stride[0]
        left = (window_idx % n_cols) * self.stride[1]
        rows = (top[:, None] + torch.arange(self.window[0], device=device)).clamp_(max=height - 1)
        cols = (left[:, None] + torch.arange(self.window[1], device=device)).clamp_(max=width - 1)
        return (rows[:, :, None] * width + cols[:, None, :]).flatten(1)

    def apply(
        self,
        images: Tensor,
        image_idx: Tensor,
        window_idx: Tensor,
        sample_idx: Tensor,
        baseline: Baseline,
    ) -> Tensor:
        """Set window ``window_idx[b]`` of ``images[b]`` (a private copy, changed in place) to the
        baseline of image ``image_idx[b]``, sample ``sample_idx[b]``."""
        images = images.contiguous()
        batch, channels = images.shape[:2]
        flat = self.pixel_index(window_idx)
        index = flat[:, None, :].expand(batch, channels, flat.shape[1])
        pixels = images.view(batch, channels, -1)
        if baseline.value is not None:
            pixels.scatter_(2, index, baseline.value)
        else:
            values = baseline.at(image_idx, sample_idx, flat).to(images.dtype)
            pixels.scatter_(2, index, values)
        return images

    def fold(self, effects: Tensor) -> Tensor:
        """Maps [N, K, H, W] from window effects [N, K, len(self)]: per pixel the mean effect of
        the windows covering it, 0 where none does."""
        n, k, count = effects.shape
        if count != len(self):
            raise ValueError(f"expected {len(self)} window effects, got {count}")
        n_rows, n_cols = self.shape
        (wh, ww), (sh, sw) = self.window, self.stride
        out_size = ((n_rows - 1) * sh + wh, (n_cols - 1) * sw + ww)

        def fold_constant(values: Tensor) -> Tensor:
            columns = values[:, None, :].expand(values.shape[0], wh * ww, count)
            return F.fold(columns, out_size, (wh, ww), stride=(sh, sw))

        coverage = fold_constant(torch.ones(1, count, dtype=effects.dtype, device=effects.device))
        flat = effects.reshape(n * k, count)
        chunk = max(1, _FOLD_CHUNK_ELEMENTS // (wh * ww * count))
        sums = torch.cat([fold_constant(part) for part in flat.split(chunk)])
        maps = torch.where(coverage > 0, sums / coverage.clamp(min=1), torch.zeros((), dtype=sums.dtype))
        maps = maps.view(n, k, *out_size)
        return _crop_or_pad(maps, self.image_size)

    assemble = fold


@dataclass(frozen=True)
class ShiftedWindowGrid(WindowGrid):
    """Windows of size ``window`` tiling the image (stride = window) from ``origin``: the tiling
    moved down and right by ``origin`` (0 <= origin < window per axis), so the first row and
    column of windows are cut to ``origin`` pixels by the border (and the last ones too). A
    randomised detector draws the origin per call, so an attacker cannot tune a perturbation to
    fixed window borders. Effects only: the windows overlap no regular fold, so no maps."""

    origin: tuple[int, int] = (0, 0)

    @classmethod
    def shifted(cls, image_size: tuple[int, int], window: int | tuple[int, int], origin: tuple[int, int]) -> ShiftedWindowGrid:
        grid = WindowGrid.create(image_size, window, window)
        if not all(0 <= o < w for o, w in zip(origin, grid.window)):
            raise ValueError(f"origin must lie in [0, window) per axis, got {origin} for window {grid.window}")
        return cls(grid.image_size, grid.window, grid.window, (int(origin[0]), int(origin[1])))

    @staticmethod
    def _starts(size: int, window: int, origin: int) -> list[int]:
        return list(range(origin - window if origin > 0 else 0, size, window))

    @property
    def rows(self) -> list[int]:
        return self._starts(self.image_size[0], self.window[0], self.origin[0])

    @property
    def cols(self) -> list[int]:
        return self._starts(self.image_size[1], self.window[1], self.origin[1])

    def pixel_index(self, window_idx: Tensor) -> Tensor:
        height, width = self.image_size
        device = window_idx.device
        rows_start = torch.tensor(self.rows, device=device)
        cols_start = torch.tensor(self.cols, device=device)
        top, left = rows_start[window_idx // len(self.cols)], cols_start[window_idx % len(self.cols)]
        # a window cut by the border repeats its edge row/column: written with the same value, harmless
        rows = (top[:, None] + torch.arange(self.window[0], device=device)).clamp_(0, height - 1)
        cols = (left[:, None] + torch.arange(self.window[1], device=device)).clamp_(0, width - 1)
        return (rows[:, :, None] * width + cols[:, None, :]).flatten(1)

    def fold(self, effects: Tensor) -> Tensor:
        raise NotImplementedError("ShiftedWindowGrid gives window effects, not maps")

    assemble = fold


def _crop_or_pad(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Cut clipped windows' overhang, or pad with 0 the border a too-large stride never reaches."""
    height, width = size
    maps = maps[..., :height, :width]
    pad_h, pad_w = height - maps.shape[-2], width - maps.shape[-1]
    if pad_h or pad_w:
        maps = F.pad(maps, (0, pad_w, 0, pad_h))
    return maps.contiguous()
