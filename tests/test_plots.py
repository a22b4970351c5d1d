"""The shared drawing helpers: colour scales, atomic saving, boxes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from causal_ie.outputs.plots import DPI, draw_box, draw_ground_truth, map_scale, overlay_rgb, plt, save_figure, signed_scale


def test_map_scale_is_centred_for_signed_maps_and_starts_at_zero_otherwise():
    norm, cmap = map_scale(np.array([-1.0, 0.5]), np.array([2.0, np.nan]))
    assert (norm.vmin, norm.vmax, cmap) == (-2.0, 2.0, "RdBu_r")
    assert norm(0.0) == pytest.approx(0.5)  # 0 is the white middle of the diverging map
    norm, cmap = map_scale(np.array([0.0, 0.5]), np.array([0.25]))
    assert (norm.vmin, norm.vmax, cmap) == (0.0, 0.5, "inferno")
    norm, _ = map_scale(np.zeros(4), np.zeros(4))
    assert norm.vmin < norm.vmax  # a flat map still gets a usable scale
    norm, cmap = map_scale(np.full(3, np.nan))
    assert (norm.vmin, norm.vmax, cmap) == (-1.0, 1.0, "RdBu_r")


def test_signed_scale_is_centred_even_for_one_signed_values():
    norm, cmap = signed_scale(np.array([0.1, 0.3]), np.array([0.2]))
    assert (norm.vmin, norm.vmax, cmap) == (-0.3, 0.3, "RdBu_r")


def test_overlay_colours_zero_white_and_keeps_the_image_size():
    image = np.full((4, 5), 0.5)
    values = np.zeros((4, 5))
    values[0, 0] = 1.0
    values[3, 4] = -1.0
    rgb = overlay_rgb(image, values, alpha=1.0)
    assert rgb.shape == (4, 5, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 0] > rgb[0, 0, 2]  # positive: red
    assert rgb[3, 4, 2] > rgb[3, 4, 0]  # negative: blue
    assert np.all(rgb[1, 1] > 240)  # zero: (nearly) white in RdBu_r


def test_save_figure_writes_the_png_atomically_and_closes_the_figure(tmp_path):
    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1])
    path = save_figure(fig, tmp_path / "sub" / "f.png")
    assert plt.imread(path).shape[:2] == (1 * DPI, 2 * DPI)
    assert not plt.fignum_exists(fig.number)
    assert [p.name for p in path.parent.iterdir()] == ["f.png"]  # no temporary file left


def test_draw_box_outlines_pixel_edges_and_skips_missing_boxes():
    fig, ax = plt.subplots()
    draw_box(ax, [2.0, 3.0, 4.0, 5.0])
    draw_box(ax, [math.nan] * 4)
    draw_box(ax, None)
    (patch,) = ax.patches
    assert patch.get_xy() == (1.5, 2.5) and (patch.get_width(), patch.get_height()) == (4.0, 5.0)
    plt.close(fig)


def test_a_mask_is_outlined_by_its_contour_and_without_one_the_box_is_drawn():
    """Two separate boxes united in one mask (an RSNA image's two opacities): two closed contours
    around them, no rectangle; an empty mask falls back to the box."""
    mask = np.zeros((32, 32), dtype=bool)
    mask[8:20, 4:10] = True
    mask[8:24, 18:28] = True
    fig, ax = plt.subplots()
    draw_ground_truth(ax, [4.0, 8.0, 24.0, 16.0], mask)
    assert not ax.patches
    (contour,) = [c for c in fig.axes[0].get_children() if type(c).__name__ == "QuadContourSet"]
    paths = contour.get_paths()[0].to_polygons() if hasattr(contour, "get_paths") else []
    assert len(paths) == 2
    xs = sorted(float(np.mean(p[:, 0])) for p in paths)
    assert 4 < xs[0] < 10 and 18 < xs[1] < 28
    draw_ground_truth(ax, [4.0, 8.0, 24.0, 16.0], np.zeros_like(mask))
    assert len(ax.patches) == 1
    plt.close(fig)
