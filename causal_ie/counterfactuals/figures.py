"""Figures of counterfactuals: the image with its boxes, each method's counterfactual and its change."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from causal_ie.outputs.plots import (
    LESION_COLOUR,
    MARKER_COLOUR,
    draw_box,
    hide_ticks,
    plt,
    save_figure,
    show_map,
    signed_scale,
)


def plot_counterfactuals(rows: Sequence[Mapping[str, Any]], methods: Sequence[str], path: str | Path) -> Path:
    """One row per (image, finding): the image, its CE map (when rows hold ``ce``), then per
    method the counterfactual and ``z - x``.

    A row holds ``image`` [H,W], ``box`` and ``marker_box`` (x, y, w, h; NaN:
    none), ``finding``, ``direction``, ``before``, optionally ``ce`` [H,W], and per
    method ``counterfactuals[m] = {"image": [H,W], "after": float}``. The lesion box
    is drawn in green, the shortcut marker's box in orange; the change uses
    one symmetric red-blue scale per row so methods compare at a glance.
    """
    with_ce = any("ce" in row for row in rows)
    first = 2 if with_ce else 1
    n_cols = first + 2 * len(methods)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(2.0 * n_cols, 2.2 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        image = np.asarray(row["image"], dtype=float)
        ax = axes[r, 0]
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        draw_box(ax, row["box"], LESION_COLOUR)
        draw_box(ax, row["marker_box"], MARKER_COLOUR)
        ax.set_title(f"{row['finding']} ({row['direction']})\ny={row['before']:.2f}", fontsize=8)
        if with_ce and "ce" in row:
            ce = np.asarray(row["ce"], dtype=float)
            ax = axes[r, 1]
            show_map(fig, ax, ce, image, row["box"], signed_scale(ce))
            draw_box(ax, row["marker_box"], MARKER_COLOUR)
            ax.set_title("CE map", fontsize=8)
        changes = {m: np.asarray(row["counterfactuals"][m]["image"], dtype=float) - image for m in methods}
        scale = signed_scale(*changes.values())  # one scale per row, so methods compare at a glance
        for c, method in enumerate(methods):
            cf = row["counterfactuals"][method]
            ax = axes[r, first + 2 * c]
            ax.imshow(cf["image"], cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{method}\ny={cf['after']:.2f}", fontsize=8)
            ax = axes[r, first + 1 + 2 * c]
            show_map(fig, ax, changes[method], box=row["box"], scale=scale, colorbar=c == len(methods) - 1)
            draw_box(ax, row["marker_box"], MARKER_COLOUR)
            ax.set_title(f"{method}: z - x", fontsize=8)
    hide_ticks(axes)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_mass_shares(summary: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Bars per finding and method: share of the change in the lesion box, and on the marker."""
    methods = list(summary)
    findings = list(dict.fromkeys(f for m in methods for f in summary[m]["per_finding"]))
    panels = ["box_mass_share", "marker_mass_share"] if any("marker_mass_share" in summary[m] for m in methods) else ["box_mass_share"]
    fig, axes = plt.subplots(1, len(panels), figsize=(0.6 * len(findings) * len(panels) + 3, 3.2), squeeze=False)
    width = 0.8 / max(len(methods), 1)
    for ax, key in zip(axes[0], panels):
        for i, method in enumerate(methods):
            per = summary[method]["per_finding"]
            values = [per.get(f, {}).get(key, np.nan) for f in findings]
            ax.bar(np.arange(len(findings)) + (i - (len(methods) - 1) / 2) * width, values, width, label=method)
        ax.set_xticks(range(len(findings)), findings, rotation=45, ha="right", fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(key.replace("_", " "), fontsize=9)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
