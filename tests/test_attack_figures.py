"""Attack and detection figures: PNGs that read back, shared colour scales, input validation."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from causal_ie.attacks import figures
from causal_ie.attacks.figures import (
    _clean_vs_adversarial_figure,
    plot_clean_vs_adversarial,
    plot_roc_curves,
    plot_statistic_histograms,
    plot_transfer_matrix,
)

from causal_ie.outputs.plots import DPI, plt

pytestmark = pytest.mark.usefixtures("one_thread")


def _example(i: int, size: int = 8, methods: tuple[str, ...] = ("ce", "ce_latent")) -> dict:
    rng = np.random.default_rng(i)
    clean = rng.random((size, size))
    adv = np.clip(clean + rng.choice([-4 / 255, 4 / 255], size=(size, size)), 0, 1)
    maps = {m: (rng.normal(size=(size, size)), 3 * rng.normal(size=(size, size))) for m in methods}
    return {
        "id": f"img{i}",
        "finding": "Mass",
        "prob_clean": 0.9,
        "prob_adv": 0.1,
        "image_clean": clean,
        "image_adv": adv,
        "box": [1.0, 2.0, 3.0, 3.0] if i % 2 == 0 else [math.nan] * 4,
        "maps": maps,
    }


@pytest.fixture
def saved(monkeypatch):
    """Figures passed to save_figure, still inspectable after it wrote and closed them."""
    kept = []
    real = figures.save_figure

    def spy(fig, path):
        kept.append(fig)
        return real(fig, path)

    monkeypatch.setattr(figures, "save_figure", spy)
    return kept


def _png_shape(path) -> tuple[int, int]:
    assert path.stat().st_size > 0
    img = plt.imread(path)
    return img.shape[0], img.shape[1]


# -- clean vs adversarial ----------------------------------------------------------------
def test_clean_vs_adversarial_has_one_row_per_example(tmp_path):
    one = plot_clean_vs_adversarial([_example(0)], tmp_path / "one.png")
    three = plot_clean_vs_adversarial([_example(i) for i in range(3)], tmp_path / "sub" / "three.png")
    h1, w1 = _png_shape(one)
    h3, w3 = _png_shape(three)
    assert w1 == w3 == round(2.1 * 7 * DPI)  # 5 panels + clean/adv of ce_latent
    assert h3 == pytest.approx(3 * h1, abs=2)
    assert not list(tmp_path.rglob(".*tmp*"))


def test_clean_and_adversarial_maps_of_one_method_share_one_colour_scale():
    examples = [_example(0), _example(1)]
    fig = _clean_vs_adversarial_figure(examples)
    try:
        rows, cols = 2, 7
        grid = np.array(fig.axes[: rows * cols]).reshape(rows, cols)  # colour bars come after the panels
        for r, ex in enumerate(examples):
            clim = {c: grid[r, c].images[0].get_clim() for c in range(1, cols)}
            ce_c, ce_a = ex["maps"]["ce"]
            v = max(np.abs(ce_c).max(), np.abs(ce_a).max())
            assert clim[1] == clim[4] == pytest.approx((-v, v))  # ce clean / adv
            assert clim[5] == clim[6]  # ce_latent clean / adv
            assert clim[5] != clim[1]  # but each method has its own scale
            linf = np.abs(ex["image_adv"] - ex["image_clean"]).max()
            assert clim[3] == pytest.approx((-linf, linf))
            assert f"{linf:.4f}" in grid[r, 3].get_title()
            assert "p=0.90" in grid[r, 0].get_title() and "p=0.10" in grid[r, 2].get_title()
    finally:
        plt.close(fig)


def test_clean_vs_adversarial_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no examples"):
        plot_clean_vs_adversarial([], tmp_path / "x.png")
    bad = _example(0)
    bad["image_adv"] = np.zeros((4, 4))
    with pytest.raises(ValueError, match="one shape"):
        plot_clean_vs_adversarial([bad], tmp_path / "x.png")
    with pytest.raises(ValueError, match="map methods"):
        plot_clean_vs_adversarial([_example(0), _example(1, methods=("ce",))], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# -- histograms ---------------------------------------------------------------------------
def test_histograms_grid_survives_an_all_nan_statistic(tmp_path, saved):
    rng = np.random.default_rng(0)
    names = ["energy", "entropy", "max", "neg_fraction", "box_ratio"]
    clean = {k: rng.normal(size=20) for k in names}
    adv = {k: rng.normal(1, size=20) for k in names}
    clean["box_ratio"][:] = np.nan
    adv["box_ratio"][:] = np.nan
    clean["max"][:3] = np.nan
    path = plot_statistic_histograms(clean, adv, tmp_path / "hist.png", ncols=4)
    assert _png_shape(path) == (round(2.3 * 2 * DPI), round(2.8 * 4 * DPI))  # 5 panels -> 2 rows of 4
    panels = saved[0].axes
    assert [ax.get_title().split("\n")[0] for ax in panels[:5]] == names
    assert "3 non-finite dropped" in panels[2].get_title()
    assert any("NaN" in t.get_text() for t in panels[4].texts)
    assert [t.get_text() for t in panels[0].get_legend().get_texts()] == ["clean", "adversarial"]
    assert not panels[5].get_visible()


def test_histograms_name_mismatched_keys_and_reject_empty_input(tmp_path):
    x = np.arange(3.0)
    with pytest.raises(ValueError, match="tv_norm"):
        plot_statistic_histograms({"energy": x, "tv_norm": x}, {"energy": x}, tmp_path / "h.png")
    with pytest.raises(ValueError, match="only_adv"):
        plot_statistic_histograms({"energy": x}, {"energy": x, "only_adv": x}, tmp_path / "h.png")
    with pytest.raises(ValueError, match="empty"):
        plot_statistic_histograms({}, {}, tmp_path / "h.png")
    with pytest.raises(ValueError, match="1-D"):
        plot_statistic_histograms({"e": np.zeros((2, 2))}, {"e": x}, tmp_path / "h.png")


# -- ROC ---------------------------------------------------------------------------------
def test_roc_curves_square_with_auroc_in_legend(tmp_path, saved):
    fpr = np.array([0.0, 0.1, 0.5, 1.0])
    curves = {"ce": (fpr, np.array([0.0, 0.6, 0.9, 1.0]), 0.8734), "gradcam": (fpr, fpr, 0.5)}
    path = plot_roc_curves(curves, tmp_path / "roc.png", title="PGD")
    h, w = _png_shape(path)
    assert h == w
    ax = saved[0].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "ce (AUROC 0.873)" in labels and "gradcam (AUROC 0.500)" in labels
    assert ax.get_xlim() == (0, 1) and ax.get_ylim() == (0, 1)


def test_roc_curves_reject_empty_and_malformed_curves(tmp_path):
    with pytest.raises(ValueError, match="no curves"):
        plot_roc_curves({}, tmp_path / "roc.png")
    with pytest.raises(ValueError, match="'ce'"):
        plot_roc_curves({"ce": (np.zeros(3), np.zeros(4), 0.5)}, tmp_path / "roc.png")


# -- transfer matrix -----------------------------------------------------------------------
def test_transfer_matrix_writes_values_in_cells(tmp_path, saved):
    runs = ["pgd_eps4_densenet121", "fgsm_eps8_resnet50", "cw"]
    m = pd.DataFrame([[0.97, 0.81, 0.6], [0.75, 0.95, np.nan], [0.5, 0.66, 0.99]], index=runs, columns=runs)
    path = plot_transfer_matrix(m, tmp_path / "transfer.png")
    _png_shape(path)
    ax = saved[0].axes[0]
    cells = [t.get_text() for t in ax.texts]
    assert cells[:3] == ["0.97", "0.81", "0.60"] and "–" in cells
    assert ax.images[0].get_clim() == (0.5, 1.0)
    assert [t.get_text() for t in ax.get_yticklabels()] == runs


def test_transfer_matrix_rejects_empty_or_non_numeric(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        plot_transfer_matrix(pd.DataFrame(), tmp_path / "t.png")
    with pytest.raises(ValueError, match="numeric"):
        plot_transfer_matrix(pd.DataFrame([["a"]], index=["r"], columns=["c"]), tmp_path / "t.png")
