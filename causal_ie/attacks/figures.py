"""Figures for the adversarial-attack and detection experiments.

Clean versus adversarial CE maps side by side, histograms of the detection
statistics, ROC curves of the detectors and the cross-run transfer matrix.
Every function validates its input, draws with matplotlib and writes a PNG
through :func:`causal_ie.outputs.plots.save_figure`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from causal_ie.outputs.plots import draw_box, hide_ticks, map_scale, plt, save_figure, show_map, signed_scale

__all__ = [
    "plot_clean_vs_adversarial",
    "plot_roc_curves",
    "plot_statistic_histograms",
    "plot_transfer_matrix",
]

_EXAMPLE_KEYS = ("finding", "prob_clean", "prob_adv", "image_clean", "image_adv", "maps")


def _fmt_p(p: Any) -> str:
    p = float(p)
    return "nan" if math.isnan(p) else f"{p:.2f}"


# -- clean vs adversarial -------------------------------------------------------------
def _check_examples(examples: Sequence[Mapping[str, Any]]) -> list[str]:
    """Validate the examples; return the map methods (insertion order of the first example)."""
    if len(examples) == 0:
        raise ValueError("plot_clean_vs_adversarial: no examples given")
    methods: list[str] | None = None
    for i, ex in enumerate(examples):
        name = f"example {i} ({ex.get('id', '?')!s})"
        missing = [k for k in _EXAMPLE_KEYS if k not in ex]
        if missing:
            raise ValueError(f"{name} lacks keys {missing}")
        clean, adv = np.asarray(ex["image_clean"]), np.asarray(ex["image_adv"])
        if clean.ndim != 2 or clean.shape != adv.shape:
            raise ValueError(
                f"{name}: image_clean and image_adv must be 2-D [H,W] of one shape, got {clean.shape} and {adv.shape}"
            )
        if not ex["maps"]:
            raise ValueError(f"{name} has no maps")
        if methods is None:
            methods = list(ex["maps"])
        elif set(ex["maps"]) != set(methods):
            raise ValueError(f"{name} has map methods {sorted(ex['maps'])}, example 0 has {sorted(methods)}")
        for method, pair in ex["maps"].items():
            if len(pair) != 2:
                raise ValueError(f"{name}: maps[{method!r}] must be a (clean, adversarial) pair")
            for which, m in zip(("clean", "adversarial"), pair):
                if np.shape(m) != clean.shape:
                    raise ValueError(
                        f"{name}: {which} map of {method!r} has shape {np.shape(m)}, the image {clean.shape}"
                    )
    assert methods is not None
    return methods


def _image_panel(fig: Figure, ax, image: np.ndarray, box) -> None:
    """The grey image with its box; an invisible colour bar keeps the panel as large as the map panels."""
    im = ax.imshow(image, cmap="gray", vmin=0, vmax=1)
    draw_box(ax, box)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.set_visible(False)


def _clean_vs_adversarial_figure(examples: Sequence[Mapping[str, Any]]) -> Figure:
    """Build (not save) the clean-vs-adversarial figure so tests can inspect its colour limits.

    The first image drawn in each map panel is the map; its ``get_clim()`` is the scale used.
    """
    methods = _check_examples(examples)
    first, rest = methods[0], methods[1:]
    rows, cols = len(examples), 5 + 2 * len(rest)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.3 * rows), squeeze=False)
    for r, ex in enumerate(examples):
        clean = np.asarray(ex["image_clean"], dtype=float)
        adv = np.asarray(ex["image_adv"], dtype=float)
        box = ex.get("box")
        row = axes[r]

        _image_panel(fig, row[0], clean, box)
        label = f"{ex['id']}: " if "id" in ex else ""
        row[0].set_title(f"{label}{ex['finding']}\nclean p={_fmt_p(ex['prob_clean'])}", fontsize=7)

        c_map, a_map = ex["maps"][first]
        scale = map_scale(c_map, a_map)  # clean and adversarial on ONE scale, to compare by eye
        show_map(fig, row[1], c_map, clean, box, scale)
        row[1].set_title(f"{first} (clean)", fontsize=7)

        _image_panel(fig, row[2], adv, box)
        row[2].set_title(f"adversarial\n{ex['finding']} p={_fmt_p(ex['prob_adv'])}", fontsize=7)

        delta = adv - clean
        show_map(fig, row[3], delta, scale=signed_scale(delta))
        linf = float(np.nanmax(np.abs(delta))) if np.isfinite(delta).any() else float("nan")
        row[3].set_title(f"perturbation adv − clean\nL∞={linf:.4f} ({255 * linf:.1f}/255)", fontsize=7)

        show_map(fig, row[4], a_map, clean, box, scale)
        row[4].set_title(f"{first} (adv)", fontsize=7)

        for k, method in enumerate(rest):
            c_map, a_map = ex["maps"][method]
            scale = map_scale(c_map, a_map)
            ax_c, ax_a = row[5 + 2 * k], row[6 + 2 * k]
            show_map(fig, ax_c, c_map, clean, box, scale)
            show_map(fig, ax_a, a_map, clean, box, scale)
            ax_c.set_title(f"{method} (clean)", fontsize=7)
            ax_a.set_title(f"{method} (adv)", fontsize=7)
    hide_ticks(axes)
    fig.tight_layout()
    return fig


def plot_clean_vs_adversarial(examples: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """One row per example: clean image, clean CE, adversarial image, perturbation, adversarial CE, then
    the clean and adversarial maps of every further method in ``ex["maps"]``.

    Clean and adversarial maps of one method share one colour scale (see
    :func:`causal_ie.outputs.plots.map_scale`) so that the change the attack made can be judged by
    eye; the perturbation ``adv - clean`` gets its own symmetric scale and its
    L-inf norm in the title. Each example is a dict with ``id``, ``finding``,
    ``prob_clean``, ``prob_adv``, ``image_clean``/``image_adv`` ([H,W] in 0..1),
    ``box`` (x, y, w, h in pixels; NaN for none) and ``maps`` (method ->
    (clean [H,W], adv [H,W])).
    """
    return save_figure(_clean_vs_adversarial_figure(examples), path)


# -- detection statistics ---------------------------------------------------------------
def _as_1d(name: str, which: str, values: Any) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"statistic {name!r} ({which}) must be a 1-D array over images, got shape {arr.shape}")
    return arr


def plot_statistic_histograms(
    clean: Mapping[str, np.ndarray],
    adversarial: Mapping[str, np.ndarray],
    path: str | Path,
    ncols: int = 4,
) -> Path:
    """Grid of histograms, one panel per statistic: clean and adversarial values overlaid on shared bins.

    Shows how well each CE-map statistic separates adversarial from clean images
    before any detector is trained. Non-finite values are dropped (their count is
    noted in the title); a panel with nothing left says so.
    """
    if not clean or not adversarial:
        raise ValueError("plot_statistic_histograms: no statistics given (clean or adversarial is empty)")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    only_clean = [k for k in clean if k not in adversarial]
    only_adv = [k for k in adversarial if k not in clean]
    if only_clean or only_adv:
        raise ValueError(
            "clean and adversarial statistics differ: "
            f"missing from adversarial {only_clean}, missing from clean {only_adv}"
        )
    names = list(clean)
    data = {k: (_as_1d(k, "clean", clean[k]), _as_1d(k, "adversarial", adversarial[k])) for k in names}

    ncols = min(ncols, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.8 * ncols, 2.3 * nrows), squeeze=False)
    legend_done = False
    for ax, name in zip(axes.flat, names):
        c, a = data[name]
        c_ok, a_ok = c[np.isfinite(c)], a[np.isfinite(a)]
        dropped = (c.size - c_ok.size) + (a.size - a_ok.size)
        title = name if not dropped else f"{name}\n({dropped} non-finite dropped)"
        ax.set_title(title, fontsize=7)
        ax.tick_params(labelsize=6)
        both = np.concatenate([c_ok, a_ok])
        if both.size == 0:
            ax.text(0.5, 0.5, "all values NaN", ha="center", va="center", fontsize=8, color="gray",
                    transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        bins = np.histogram_bin_edges(both, bins=min(30, max(5, int(np.sqrt(both.size)))))
        ax.hist(c_ok, bins=bins, alpha=0.5, color="tab:blue", label="clean")
        ax.hist(a_ok, bins=bins, alpha=0.5, color="tab:red", label="adversarial")
        ax.set_ylim(top=1.2 * ax.get_ylim()[1])  # headroom for the legend
        if not legend_done:  # the first panel with data
            ax.legend(fontsize=6, frameon=False)
            legend_done = True
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    fig.tight_layout()
    return save_figure(fig, path)


# -- detector ROC ----------------------------------------------------------------------
def plot_roc_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]],
    path: str | Path,
    title: str = "",
) -> Path:
    """ROC curves of several detectors on one square axes, name -> (fpr, tpr, auroc).

    The dotted line at FPR = 0.05 marks where the reported TPR@5%FPR is read.
    """
    if not curves:
        raise ValueError("plot_roc_curves: no curves given")
    checked: list[tuple[str, np.ndarray, np.ndarray, float]] = []
    for name, curve in curves.items():
        if len(curve) != 3:
            raise ValueError(f"curve {name!r} must be (fpr, tpr, auroc), got {len(curve)} items")
        fpr, tpr, auroc = np.asarray(curve[0], dtype=float), np.asarray(curve[1], dtype=float), float(curve[2])
        if fpr.ndim != 1 or fpr.shape != tpr.shape or fpr.size < 2:
            raise ValueError(
                f"curve {name!r}: fpr and tpr must be 1-D of one length >= 2, got {fpr.shape} and {tpr.shape}"
            )
        checked.append((str(name), fpr, tpr, auroc))
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=0.8, label="chance")
    ax.axvline(0.05, linestyle=":", color="black", linewidth=0.8, label="FPR = 0.05")
    for name, fpr, tpr, auroc in checked:
        auc = "nan" if math.isnan(auroc) else f"{auroc:.3f}"
        ax.plot(fpr, tpr, linewidth=1.4, label=f"{name} (AUROC {auc})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate (clean flagged)", fontsize=8)
    ax.set_ylabel("true positive rate (adversarial caught)", fontsize=8)
    ax.tick_params(labelsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)


# -- transfer between runs ---------------------------------------------------------------
def plot_transfer_matrix(matrix: pd.DataFrame, path: str | Path) -> Path:
    """Heat map of detection AUROC, rows = run the detector was trained on, columns = run it was tested on.

    The diagonal is in-distribution detection; off-diagonal cells show whether a
    detector transfers to another attack, model or data set. Cells carry their
    value (2 decimals); the colour scale is fixed to 0.5 (chance) .. 1.
    """
    if not isinstance(matrix, pd.DataFrame):
        raise ValueError(f"plot_transfer_matrix expects a pandas DataFrame, got {type(matrix).__name__}")
    if matrix.empty:
        raise ValueError("plot_transfer_matrix: the matrix is empty")
    try:
        values = matrix.to_numpy(dtype=float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"plot_transfer_matrix: values must be numeric AUROCs ({err})") from err
    rows, cols = [str(r) for r in matrix.index], [str(c) for c in matrix.columns]
    nr, nc = values.shape
    # room for the longest labels: ~0.065 inch per character at fontsize 7
    label_w = 0.065 * max(len(s) for s in rows)
    label_h = 0.065 * max(len(s) for s in cols) * 0.75  # 45 degree labels need ~sin(45) of their length
    fig, ax = plt.subplots(figsize=(1.5 + label_w + 0.7 * nc, 1.0 + label_h + 0.55 * nr))
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgray")  # a copy: NaN cells grey
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.5, vmax=1.0, aspect="auto")
    for i in range(nr):
        for j in range(nc):
            v = values[i, j]
            text = "–" if math.isnan(v) else f"{v:.2f}"
            colour = "black" if (math.isnan(v) or v > 0.8) else "white"  # viridis is light above ~0.8
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(nc), cols, rotation=45, ha="right", rotation_mode="anchor", fontsize=7)
    ax.set_yticks(range(nr), rows, fontsize=7)
    ax.set_xlabel("tested on", fontsize=8)
    ax.set_ylabel("detector trained on", fontsize=8)
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cbar.ax.tick_params(labelsize=6)
    cbar.set_label("detection AUROC", fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
