"""Figures of the localisation study: maps beside the image and its box, scores per method."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from causal_ie.outputs.plots import draw_box, hide_ticks, plt, save_figure, show_map


def plot_examples(examples: Sequence[Mapping[str, Any]], methods: Sequence[str], path: str | Path) -> Path:
    """One row per (image, finding): the image with its box, then each method's map on its own
    scale (signed CE maps centred at 0, CAMs from 0; see :func:`causal_ie.outputs.plots.map_scale`).

    An example holds ``image`` [H, W], ``box`` (x, y, w, h; NaN: none), ``finding``, ``prob``
    and ``maps`` (method -> [H, W]).
    """
    rows, cols = len(examples), 1 + len(methods)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.2 * rows), squeeze=False)
    for r, ex in enumerate(examples):
        ax = axes[r, 0]
        ax.imshow(ex["image"], cmap="gray", vmin=0, vmax=1)
        draw_box(ax, ex["box"])
        ax.set_title(f"{ex['finding']}\np={ex['prob']:.2f}", fontsize=8)
        for c, method in enumerate(methods, start=1):
            show_map(fig, axes[r, c], np.asarray(ex["maps"][method], dtype=float), ex["image"], ex["box"])
            if r == 0:
                axes[r, c].set_title(method, fontsize=9)
    hide_ticks(axes)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_method_scores(results: Mapping[str, Any], path: str | Path) -> Path | None:
    """Bars per method: pointing game, energy pointing game, deletion and insertion AUC."""
    loc = results.get("localisation", {})
    faith = results.get("faithfulness", {})
    methods = list(loc) or list(faith)
    if not methods:
        return None
    scores = {
        "pointing game ↑": [loc.get(m, {}).get("pointing_game", np.nan) for m in methods],
        "energy pointing game ↑": [loc.get(m, {}).get("energy_pointing_game", np.nan) for m in methods],
        "deletion AUC ↓": [faith.get(m, {}).get("deletion_auc", np.nan) for m in methods],
        "insertion AUC ↑": [faith.get(m, {}).get("insertion_auc", np.nan) for m in methods],
    }
    fig, axes = plt.subplots(1, len(scores), figsize=(3.2 * len(scores), 3), squeeze=False)
    for ax, (title, vals) in zip(axes[0], scores.items()):
        ax.bar(range(len(methods)), vals, color=["tab:red" if m.startswith("ce") else "tab:gray" for m in methods])
        ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, 1)
    fig.tight_layout()
    return save_figure(fig, path)
