"""Intervals of the evaluation's scores resample whole patients."""

from __future__ import annotations

import numpy as np
import pytest

from causal_ie.explain.intervals import classification_intervals, localisation_intervals


def test_pointing_game_interval_resamples_patients_not_pairs():
    hits = np.array([1.0, 0.0, 1.0, 0.0])
    pairs = {"ce": {"hit": hits, "iou": np.full(4, 0.6), "iobb": np.full(4, 0.6)},
             "gradcam": {"hit": np.zeros(4), "iou": np.zeros(4), "iobb": np.zeros(4)}}
    # each patient holds one hit and one miss: every resample of patients scores 0.5
    same = localisation_intervals(pairs, ["a", "a", "b", "b"], (0.5,), n_boot=200, seed=0)
    assert same["ce"]["pointing_game_ci_low"] == same["ce"]["pointing_game_ci_high"] == 0.5
    # four independent patients: the resamples vary
    apart = localisation_intervals(pairs, ["a", "b", "c", "d"], (0.5,), n_boot=200, seed=0)
    assert apart["ce"]["pointing_game_ci_low"] < 0.5 < apart["ce"]["pointing_game_ci_high"]
    assert apart["ce"]["iobb@0.5_ci_low"] == apart["ce"]["iobb@0.5_ci_high"] == 1.0
    minus = apart["ce"]["minus"]["gradcam"]
    assert minus["pointing_game"] == pytest.approx(0.5) and minus["iobb@0.5"] == pytest.approx(1.0)
    assert "minus" not in apart["gradcam"]


def test_classification_intervals_skip_findings_without_both_classes():
    labels = np.array([[1, 0], [0, 0], [1, 0], [0, 0]], dtype=float)
    probs = np.array([[0.9, 0.1], [0.2, 0.3], [0.8, 0.2], [0.1, 0.4]])
    out = classification_intervals(probs, labels, ["a", "b", "c", "d"], np.array([True, True]), ("A", "B"), 200, 0)
    assert out["auroc_mean_ci_low"] == out["auroc_mean_ci_high"] == 1.0  # finding A is perfectly ranked
    assert set(out["auroc"]) == {"A_ci_low", "A_ci_high"}  # B has no positive case
