"""Drawing helpers every figure of the project shares.

- :func:`save_figure`: a PNG written atomically (a crash never leaves half a file);
- :func:`draw_box`: a lesion or marker box on an image axis;
- :func:`map_scale`: the colour scale of a map, or of several maps compared by
  eye: signed maps (CE: removing a region can raise a prediction) on a diverging
  map centred at 0 (matplotlib's ``CenteredNorm``), non-negative maps (CAMs) from 0;
- :func:`show_map`: a map on its scale with the grey image faintly on top, the
  box and a small colour bar;
- :func:`interval_bars`: bars with their 95 % intervals as asymmetric error bars
  (from results.json's ``<key>_ci_low`` / ``<key>_ci_high``; see :func:`interval_of`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # figures are files; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import CenteredNorm, Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from causal_ie.io import atomic_open  # noqa: E402
from causal_ie.outputs.tables import CI_HIGH, CI_LOW  # noqa: E402

SIGNED_CMAP = "RdBu_r"  # red: the region supports the finding, blue: it speaks against it
UNSIGNED_CMAP = "inferno"  # CAMs and other maps without sign
DPI = 110
LESION_COLOUR, MARKER_COLOUR = "lime", "orange"
_TINY = 1e-8  # keeps colour limits apart when a map is constant


def save_figure(fig: Figure, path: str | Path, dpi: int = DPI) -> Path:
    """Save ``fig`` as ``path`` (format from the suffix) atomically and close it."""
    path = Path(path)
    try:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


def draw_box(ax, box: Sequence[float] | None, color: str = LESION_COLOUR) -> None:
    """Outline box ``(x, y, w, h)`` (pixel-edge coordinates); nothing for None or NaNs."""
    if box is None or any(math.isnan(float(v)) for v in box):
        return
    x, y, w, h = (float(v) for v in box)
    # imshow puts pixel centres at integers, so pixel edges lie at -0.5
    ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor=color, linewidth=1.5))


def draw_ground_truth(ax, box: Sequence[float] | None, mask: np.ndarray | None = None,
                      color: str = LESION_COLOUR) -> None:
    """Outline a ground-truth ``mask`` [H, W] (its contour: a segmentation, or several boxes
    united) when there is one, else ``box`` (:func:`draw_box`)."""
    if mask is None or not np.asarray(mask).any():
        draw_box(ax, box, color)
        return
    ax.contour(np.asarray(mask, dtype=float), levels=[0.5], colors=[color], linewidths=1.2)


def map_scale(*maps: np.ndarray) -> tuple[Normalize, str]:
    """One colour scale for ``maps`` (NaNs ignored): centred at 0 on :data:`SIGNED_CMAP` up to
    the largest |value| when any value is negative, else 0..max on :data:`UNSIGNED_CMAP`."""
    values = np.concatenate([np.asarray(m, dtype=float).ravel() for m in maps]) if maps else np.empty(0)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return CenteredNorm(vcenter=0.0, halfrange=1.0), SIGNED_CMAP
    lo, hi = float(values.min()), float(values.max())
    if lo < 0:
        return CenteredNorm(vcenter=0.0, halfrange=max(-lo, hi, _TINY)), SIGNED_CMAP
    return Normalize(vmin=0.0, vmax=max(hi, _TINY)), UNSIGNED_CMAP


def signed_scale(*maps: np.ndarray) -> tuple[Normalize, str]:
    """A diverging scale centred at 0 even when every value has one sign (a perturbation,
    a counterfactual's change)."""
    values = np.concatenate([np.abs(np.asarray(m, dtype=float)).ravel() for m in maps]) if maps else np.empty(0)
    values = values[np.isfinite(values)]
    return CenteredNorm(vcenter=0.0, halfrange=max(float(values.max()) if values.size else 0.0, _TINY)), SIGNED_CMAP


def show_map(
    fig: Figure,
    ax,
    values: np.ndarray,
    image: np.ndarray | None = None,
    box: Sequence[float] | None = None,
    scale: tuple[Normalize, str] | None = None,
    colorbar: bool = True,
    mask: np.ndarray | None = None,
):
    """``values`` on ``scale`` (default :func:`map_scale` of this map), the grey ``image`` faintly
    on top, the ground truth (``mask``'s outline, else ``box``) and a colour bar. Returns the
    map's ``AxesImage``."""
    norm, cmap = scale or map_scale(values)
    artist = ax.imshow(np.asarray(values, dtype=float), cmap=cmap, norm=norm)
    if image is not None:
        ax.imshow(image, cmap="gray", alpha=0.25, vmin=0, vmax=1)
    draw_ground_truth(ax, box, mask)
    if colorbar:
        fig.colorbar(artist, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=5)
    return artist


def overlay_rgb(image: np.ndarray, values: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """uint8 RGB of the grey ``image`` under ``values`` coloured by :func:`map_scale` (for loggers
    that take pixels, such as W&B)."""
    norm, cmap = map_scale(values)
    colours = matplotlib.colormaps[cmap](norm(np.asarray(values, dtype=float)))[..., :3]
    gray = np.repeat(np.asarray(image, dtype=float)[..., None], 3, axis=-1)
    return (255 * ((1 - alpha) * gray + alpha * colours)).clip(0, 255).astype(np.uint8)


def hide_ticks(axes) -> None:
    for ax in np.asarray(axes).flat:
        ax.set_xticks([])
        ax.set_yticks([])


def interval_of(results: Mapping[str, Any], key: str) -> tuple[float, float, float]:
    """``(value, low, high)`` of ``key`` in ``results`` (the mapping holding it and its
    ``_ci_low`` / ``_ci_high`` siblings); NaN for whatever is absent."""

    def get(name: str) -> float:
        value = results.get(name)
        return float("nan") if value is None else float(value)

    return get(key), get(f"{key}{CI_LOW}"), get(f"{key}{CI_HIGH}")


def interval_bars(
    ax,
    labels: Sequence[str],
    values: Sequence[float],
    lows: Sequence[float],
    highs: Sequence[float],
    colors: Sequence[str] | str | None = None,
):
    """One bar per label and, where both bounds are finite, its interval as an asymmetric
    black error bar with caps (no error bar where there is no interval). Returns the bars."""
    x = np.arange(len(labels))
    values, lows, highs = (np.asarray(a, dtype=float) for a in (values, lows, highs))
    bars = ax.bar(x, values, color=colors)
    has = np.isfinite(values) & np.isfinite(lows) & np.isfinite(highs)
    if has.any():
        below = np.clip(values[has] - lows[has], 0, None)  # a bound on the wrong side: no negative arm
        above = np.clip(highs[has] - values[has], 0, None)
        ax.errorbar(x[has], values[has], yerr=np.stack([below, above]), fmt="none", ecolor="black",
                    elinewidth=1, capsize=3)
    ax.set_xticks(x, list(labels))
    return bars
