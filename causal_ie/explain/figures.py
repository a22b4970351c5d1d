"""Figures of the localisation study: maps beside the image and its box, scores per method."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from causal_ie.outputs.plots import draw_ground_truth, hide_ticks, interval_bars, interval_of, plt, save_figure, show_map


def plot_examples(examples: Sequence[Mapping[str, Any]], methods: Sequence[str], path: str | Path) -> Path:
    """One row per (image, finding): the image with its box, then each method's map on its own
    scale (signed CE maps centred at 0, CAMs from 0; see :func:`causal_ie.outputs.plots.map_scale`).

    An example holds ``image`` [H, W], ``box`` (x, y, w, h; NaN: none), ``finding``, ``prob``
    and ``maps`` (method -> [H, W]), and ``mask`` [H, W] where the ground truth is a mask (its
    outline is drawn instead of the box).
    """
    rows, cols = len(examples), 1 + len(methods)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.2 * rows), squeeze=False)
    for r, ex in enumerate(examples):
        ax = axes[r, 0]
        ax.imshow(ex["image"], cmap="gray", vmin=0, vmax=1)
        draw_ground_truth(ax, ex["box"], ex.get("mask"))
        ax.set_title(f"{ex['finding']}\np={ex['prob']:.2f}", fontsize=8)
        for c, method in enumerate(methods, start=1):
            show_map(fig, axes[r, c], np.asarray(ex["maps"][method], dtype=float), ex["image"], ex["box"],
                     mask=ex.get("mask"))
            if r == 0:
                axes[r, c].set_title(method, fontsize=9)
    hide_ticks(axes)
    fig.tight_layout()
    return save_figure(fig, path)


# panel title -> (results section, key); a key's interval, where results.json holds one, is its error bar
SCORE_PANELS = {
    "pointing game ↑": ("localisation", "pointing_game"),
    "energy pointing game ↑": ("localisation", "energy_pointing_game"),
    "IoBB@0.5 ↑": ("localisation", "iobb@0.5"),
    "deletion AUC ↓": ("faithfulness", "deletion_auc"),
    "insertion AUC ↑": ("faithfulness", "insertion_auc"),
}


def plot_method_scores(results: Mapping[str, Any], path: str | Path) -> Path | None:
    """Bars per method of the :data:`SCORE_PANELS` any method has (pointing game, energy
    pointing game, IoBB@0.5, deletion and insertion AUC), with 95 % intervals as error bars
    where results.json holds them; None without methods."""
    loc = results.get("localisation", {})
    faith = results.get("faithfulness", {})
    methods = list(loc) or list(faith)
    if not methods:
        return None
    panels = {
        title: [interval_of(results.get(section, {}).get(m, {}), key) for m in methods]
        for title, (section, key) in SCORE_PANELS.items()
        if any(key in results.get(section, {}).get(m, {}) for m in methods)
    }
    if not panels:
        return None
    colors = ["tab:red" if m.startswith("ce") else "tab:gray" for m in methods]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3), squeeze=False)
    for ax, (title, scores) in zip(axes[0], panels.items()):
        values, lows, highs = zip(*scores)
        interval_bars(ax, methods, values, lows, highs, colors)
        ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, 1)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_explanation(figure: Mapping[str, Any], path: str | Path) -> Path:
    """One explained file: the image, the CE map of each of its most likely labels and its
    CAM, each titled with the label's probability and with a colour bar (CE signed, centred
    at 0; the CAM from 0). ``figure``: ``image`` [S, S], ``maps`` [(label, probability,
    map)], optionally ``cam`` (method, label, probability, map)."""
    panels = [(f"{name}\nCE, p={prob:.2f}", m) for name, prob, m in figure["maps"]]
    if figure.get("cam") is not None:
        method, name, prob, cam = figure["cam"]
        panels.append((f"{name}\n{method}, p={prob:.2f}", cam))
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(2.4 * (1 + len(panels)), 2.6), squeeze=False)
    axes[0, 0].imshow(figure["image"], cmap="gray", vmin=0, vmax=1)
    axes[0, 0].set_title("image", fontsize=8)
    for ax, (title, values) in zip(axes[0, 1:], panels):
        show_map(fig, ax, np.asarray(values, dtype=float), figure["image"])
        ax.set_title(title, fontsize=8)
    hide_ticks(axes)
    fig.tight_layout()
    return save_figure(fig, path)
