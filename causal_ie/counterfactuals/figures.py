"""Figures of counterfactuals: the image with its boxes, each method's counterfactual and its change."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # figures are files; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from causal_ie.report import _draw_box, _save  # noqa: E402

LESION, MARKER = "lime", "orange"


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
        _draw_box(ax, row["box"], LESION)
        _draw_box(ax, row["marker_box"], MARKER)
        ax.set_title(f"{row['finding']} ({row['direction']})\ny={row['before']:.2f}", fontsize=8)
        if with_ce and "ce" in row:
            ce = np.asarray(row["ce"], dtype=float)
            v = max(float(np.abs(ce).max()), 1e-6)
            ax = axes[r, 1]
            im = ax.imshow(ce, cmap="RdBu_r", vmin=-v, vmax=v)
            ax.imshow(image, cmap="gray", alpha=0.25, vmin=0, vmax=1)
            _draw_box(ax, row["box"], LESION)
            _draw_box(ax, row["marker_box"], MARKER)
            ax.set_title("CE map", fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=5)
        changes = {m: np.asarray(row["counterfactuals"][m]["image"], dtype=float) - image for m in methods}
        scale = max(max(float(np.abs(c).max()) for c in changes.values()), 1e-6)
        for c, method in enumerate(methods):
            cf = row["counterfactuals"][method]
            ax = axes[r, first + 2 * c]
            ax.imshow(cf["image"], cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{method}\ny={cf['after']:.2f}", fontsize=8)
            ax = axes[r, first + 1 + 2 * c]
            im = ax.imshow(changes[method], cmap="RdBu_r", vmin=-scale, vmax=scale)
            _draw_box(ax, row["box"], LESION)
            _draw_box(ax, row["marker_box"], MARKER)
            ax.set_title(f"{method}: z - x", fontsize=8)
        fig.colorbar(im, ax=axes[r, -1], fraction=0.046, pad=0.02).ax.tick_params(labelsize=5)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return _save(fig, path)


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
    return _save(fig, path)
