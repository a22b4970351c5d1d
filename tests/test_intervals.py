"""Confidence intervals: DeLong against a brute-force implementation, bootstrap against a naive loop,
Wilson against hand-computed values, coverage on simulated data."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from causal_ie.attacks.detection import tpr_at_fpr
from causal_ie.intervals import (
    Interval,
    auroc_bootstrap_ci,
    auroc_ci,
    auroc_difference_bootstrap_ci,
    auroc_difference_ci,
    bootstrap_ci,
    bootstrap_difference_ci,
    delong_auroc,
    mean_ci,
    tpr_at_fpr_ci,
    weighted_auroc,
    weighted_mean,
    weighted_tpr_at_fpr,
    wilson_ci,
)


def psi(x: float, y: float) -> float:
    return 1.0 if x > y else 0.5 if x == y else 0.0


def brute_components(labels, scores):
    """DeLong's structural components by their O(m n) definition."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    v10 = np.array([np.mean([psi(x, y) for y in neg]) for x in pos])
    v01 = np.array([np.mean([psi(x, y) for x in pos]) for y in neg])
    return v10, v01


def brute_variance(v10, v01):
    m, n = len(v10), len(v01)
    s10 = ((v10 - v10.mean()) ** 2).sum() / (m - 1)
    s01 = ((v01 - v01.mean()) ** 2).sum() / (n - 1)
    return s10 / m + s01 / n


@pytest.fixture
def tied_data():
    """Imbalanced labels, rounded scores (many ties)."""
    rng = np.random.default_rng(3)
    labels = np.r_[np.zeros(37), np.ones(23)].astype(int)
    scores = np.round(np.r_[rng.normal(size=37), rng.normal(0.8, 1.3, size=23)], 1)
    perm = rng.permutation(60)
    return labels[perm], scores[perm]


# ----------------------------------------------------------------------------- DeLong


def test_delong_matches_brute_force_and_sklearn(tied_data):
    labels, scores = tied_data
    auc, var = delong_auroc(labels, scores)
    v10, v01 = brute_components(labels, scores)
    assert auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert auc == pytest.approx(v10.mean(), abs=1e-12)
    assert var == pytest.approx(brute_variance(v10, v01), abs=1e-10)


def test_delong_difference_matches_brute_force(tied_data):
    labels, a = tied_data
    b = np.round(a + np.random.default_rng(4).normal(0, 0.7, size=len(a)), 1)
    v10a, v01a = brute_components(labels, a)
    v10b, v01b = brute_components(labels, b)
    # var(A - B) = var A + var B - 2 cov(A, B), each from the brute-force components
    m, n = len(v10a), len(v01a)
    cov = np.cov(v10a, v10b)[0, 1] / m + np.cov(v01a, v01b)[0, 1] / n
    var = brute_variance(v10a, v01a) + brute_variance(v10b, v01b) - 2 * cov
    diff = roc_auc_score(labels, a) - roc_auc_score(labels, b)
    ci = auroc_difference_ci(labels, a, b)
    z = norm.ppf(0.975)
    assert ci.estimate == pytest.approx(diff, abs=1e-12)
    assert ci.low == pytest.approx(diff - z * math.sqrt(var), abs=1e-10)
    assert ci.high == pytest.approx(diff + z * math.sqrt(var), abs=1e-10)
    assert ci.method == "delong"


def test_auroc_ci_is_the_logit_interval(tied_data):
    labels, scores = tied_data
    auc, var = delong_auroc(labels, scores)
    ci = auroc_ci(labels, scores, level=0.9)
    z = norm.ppf(0.95)
    se = math.sqrt(var) / (auc * (1 - auc))
    lo, hi = (1 / (1 + math.exp(-(math.log(auc / (1 - auc)) + d * z * se))) for d in (-1, 1))
    assert tuple(ci) == pytest.approx((auc, lo, hi), abs=1e-12)
    assert 0 < ci.low < ci.estimate < ci.high < 1
    assert (ci.level, ci.method) == (0.9, "delong-logit")


def test_perfect_separation_gives_a_zero_width_interval():
    labels = np.r_[np.zeros(5), np.ones(5)]
    scores = np.r_[np.arange(5.0), np.arange(10.0, 15.0)]
    assert delong_auroc(labels, scores) == (1.0, 0.0)
    assert tuple(auroc_ci(labels, scores)) == (1.0, 1.0, 1.0)
    assert tuple(auroc_ci(labels, -scores)) == (0.0, 0.0, 0.0)
    assert tuple(auroc_bootstrap_ci(labels, scores, None, n_boot=200)) == (1.0, 1.0, 1.0)


def test_identical_detectors_differ_by_exactly_zero(tied_data):
    labels, scores = tied_data
    groups = np.arange(len(labels)) // 3
    assert tuple(auroc_difference_ci(labels, scores, scores)) == (0.0, 0.0, 0.0)
    ci = auroc_difference_bootstrap_ci(labels, scores, scores.copy(), groups, n_boot=300)
    assert tuple(ci) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    "call",
    [
        lambda: delong_auroc([0, 1, 1], [0.1, 0.2, 0.3]),  # one negative: no DeLong variance
        lambda: delong_auroc([0, 2, 1, 0], [0.1, 0.2, 0.3, 0.4]),
        lambda: delong_auroc([0, 1, 1, 0], [0.1, 0.2, 0.3]),
        lambda: delong_auroc([0, 1, 1, 0], [0.1, np.nan, 0.3, 0.2]),
        lambda: auroc_ci([0, 1, 1, 0], [0.1, 0.2, 0.3, 0.4], level=95),
    ],
)
def test_delong_bad_input(call):
    with pytest.raises(ValueError, match="labels|scores|level"):
        call()


# ----------------------------------------------------------------------------- Wilson


def test_wilson_hand_computed():
    ci = wilson_ci(8, 10)
    assert (ci.estimate, ci.method) == (0.8, "wilson")
    assert (ci.low, ci.high) == pytest.approx((0.4902, 0.9433), abs=5e-5)
    # z = 1.959964; 0/10: (0, z^2 / (n + z^2)); 10/10 mirrors it
    z2 = norm.ppf(0.975) ** 2
    assert tuple(wilson_ci(0, 10)) == pytest.approx((0.0, 0.0, z2 / (10 + z2)), abs=1e-12)
    assert tuple(wilson_ci(10, 10)) == pytest.approx((1.0, 10 / (10 + z2), 1.0), abs=1e-12)
    assert tuple(wilson_ci(1, 2)) == pytest.approx((0.5, 0.0945, 0.9055), abs=5e-5)


@pytest.mark.parametrize("args", [(3, 0), (11, 10), (-1, 10), (2.5, 10)])
def test_wilson_bad_input(args):
    with pytest.raises(ValueError, match="successes|n must"):
        wilson_ci(*args)


# ----------------------------------------------------------------------------- weighted statistics


def test_weighted_statistics_equal_the_statistic_on_duplicated_rows(tied_data):
    labels, scores = tied_data
    weights = np.random.default_rng(5).integers(0, 4, size=(6, len(labels)))
    for w in weights:
        rows = np.repeat(np.arange(len(labels)), w)
        expected = roc_auc_score(labels[rows], scores[rows])
        assert weighted_auroc(labels, scores, w)[0] == pytest.approx(expected, abs=1e-12)
        assert weighted_tpr_at_fpr(labels, scores, w, 0.1)[0] == tpr_at_fpr(labels[rows], scores[rows], 0.1)
        assert weighted_mean(scores, w)[0] == pytest.approx(scores[rows].mean(), abs=1e-12)
    ones = np.ones(len(labels))
    assert weighted_tpr_at_fpr(labels, scores, ones)[0] == tpr_at_fpr(labels, scores, 0.05)


def test_weighted_auroc_is_nan_without_one_class():
    labels = np.array([0, 0, 1, 1])
    w = np.array([[1, 2, 0, 0], [0, 0, 1, 1], [1, 0, 0, 1]])
    out = weighted_auroc(labels, [0.1, 0.2, 0.3, 0.4], w)
    assert np.isnan(out[:2]).all() and out[2] == 1.0
    assert np.isnan(weighted_tpr_at_fpr(labels, [0.1, 0.2, 0.3, 0.4], w)[:2]).all()


# ----------------------------------------------------------------------------- bootstrap


def naive_bootstrap(statistic, groups, arrays, n_boot, level, seed):
    """The documented resampling, one resample at a time: draw G patients with replacement, stack their rows."""
    distinct = sorted({str(g) for g in groups})
    members = {g: [i for i, h in enumerate(groups) if str(h) == g] for g in distinct}
    rng = np.random.default_rng(seed)
    values, dropped = [], 0
    for _ in range(n_boot):
        drawn = rng.integers(0, len(distinct), size=len(distinct))
        rows = np.concatenate([members[distinct[d]] for d in drawn])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn warns (and returns NaN) on one class only
            value = statistic(*(a[rows] for a in arrays))
        if np.isfinite(value):
            values.append(value)
        else:
            dropped += 1
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return statistic(*arrays), low, high, dropped


@pytest.mark.parametrize("one_per_patient", [True, False])
def test_bootstrap_matches_a_naive_loop(tied_data, one_per_patient):
    labels, scores = tied_data
    n = len(labels)
    groups = [f"p{i}" for i in range(n)] if one_per_patient else [f"p{i % 17}" for i in range(n)]
    ci = auroc_bootstrap_ci(labels, scores, groups, n_boot=300, level=0.9, seed=11)
    est, low, high, dropped = naive_bootstrap(roc_auc_score, groups, (labels, scores), 300, 0.9, 11)
    assert tuple(ci) == pytest.approx((est, low, high), abs=1e-12)
    assert (ci.n_resamples, ci.n_dropped, ci.method) == (300, dropped, "bootstrap-percentile")


def test_bootstrap_counts_and_drops_undefined_resamples():
    # 2 positives among 12 single-image patients: some resamples draw no positive
    labels = np.zeros(12)
    labels[[5, 11]] = 1
    scores = np.linspace(0, 1, 12)
    groups = [str(i) for i in range(12)]
    ci = auroc_bootstrap_ci(labels, scores, groups, n_boot=400, seed=1)
    _, low, high, dropped = naive_bootstrap(roc_auc_score, groups, (labels, scores), 400, 0.95, 1)
    assert 0 < ci.n_dropped == dropped
    assert (ci.low, ci.high) == pytest.approx((low, high), abs=1e-12)
    assert ci.low < ci.estimate < ci.high


def test_bootstrap_tpr_and_mean_match_naive_loops(tied_data):
    labels, scores = tied_data
    groups = [i % 13 for i in range(len(labels))]
    ci = tpr_at_fpr_ci(labels, scores, groups, fpr=0.1, n_boot=200, seed=2)
    tpr = lambda y, s: tpr_at_fpr(y, s, 0.1)  # noqa: E731
    est, low, high, dropped = naive_bootstrap(tpr, groups, (labels, scores), 200, 0.95, 2)
    assert (tuple(ci), ci.n_dropped) == (pytest.approx((est, low, high), abs=1e-12), dropped)
    hits = np.clip(scores, 0, 1)  # fractional "pointing-game" values
    ci = mean_ci(hits, groups, n_boot=200, seed=2)
    est, low, high, _ = naive_bootstrap(np.mean, groups, (hits,), 200, 0.95, 2)
    assert tuple(ci) == pytest.approx((est, low, high), abs=1e-12)


def test_bootstrap_difference_uses_the_same_resamples(tied_data):
    labels, a = tied_data
    b = a + np.random.default_rng(8).normal(0, 1, size=len(a))
    groups = [i % 20 for i in range(len(labels))]
    ci = auroc_difference_bootstrap_ci(labels, a, b, groups, n_boot=250, seed=4)
    diff = lambda y, sa, sb: roc_auc_score(y, sa) - roc_auc_score(y, sb)  # noqa: E731
    est, low, high, _ = naive_bootstrap(diff, groups, (labels, a, b), 250, 0.95, 4)
    assert tuple(ci) == pytest.approx((est, low, high), abs=1e-12)
    # generic form: a statistic per detector
    generic = bootstrap_difference_ci(
        lambda y, sa, sb, weights: weighted_auroc(y, sa, weights),
        lambda y, sa, sb, weights: weighted_auroc(y, sb, weights),
        groups, labels, a, b, n_boot=250, seed=4,
    )
    assert generic == ci


def test_bootstrap_does_not_depend_on_row_order_and_is_seeded(tied_data):
    labels, scores = tied_data
    groups = np.array([f"p{i % 9}" for i in range(len(labels))])
    perm = np.random.default_rng(0).permutation(len(labels))
    ci = auroc_bootstrap_ci(labels, scores, groups, n_boot=200, seed=5)
    assert auroc_bootstrap_ci(labels[perm], scores[perm], groups[perm], n_boot=200, seed=5) == ci
    assert auroc_bootstrap_ci(labels, scores, groups, n_boot=200, seed=6) != ci


def test_bootstrap_chunks_give_the_same_interval(tied_data, monkeypatch):
    import causal_ie.intervals as intervals

    labels, scores = tied_data
    ci = auroc_bootstrap_ci(labels, scores, None, n_boot=100, seed=3)
    monkeypatch.setattr(intervals, "_CHUNK_ENTRIES", 7 * len(labels))  # 7 resamples per chunk
    assert auroc_bootstrap_ci(labels, scores, None, n_boot=100, seed=3) == ci


def test_interval_unpacks_and_serialises():
    ci = Interval(0.7, 0.6, 0.8, 0.95, "bootstrap-percentile", 100, 3)
    est, low, high = ci
    assert (est, low, high) == (0.7, 0.6, 0.8)
    assert ci.as_dict() == {
        "estimate": 0.7, "low": 0.6, "high": 0.8, "level": 0.95,
        "method": "bootstrap-percentile", "n_resamples": 100, "n_dropped": 3,
    }


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: auroc_bootstrap_ci([0, 1, 0, 1], [1, 2, 3, 4], ["a", "b"]), "groups has 2 entries"),
        (lambda: auroc_bootstrap_ci([0, 0, 0, 0], [1, 2, 3, 4], None), "undefined"),
        (lambda: auroc_bootstrap_ci([0, 1, 0, 1], [1, 2, 3, 4], None, n_boot=0), "n_boot"),
        (lambda: auroc_bootstrap_ci([0, 1, 0, 1], [1, 2, 3, 4], None, level=1.0), "level"),
        (lambda: tpr_at_fpr_ci([0, 1, 0, 1], [1, 2, 3, 4], None, fpr=5), "fpr"),
        (lambda: bootstrap_ci(lambda x, weights: 1.0, None, np.arange(4.0)), "one value per weight row"),
        (lambda: bootstrap_ci(weighted_mean, None, np.arange(4.0), np.arange(3.0)), "same number of rows"),
        (lambda: weighted_auroc([0, 1], [1.0, 2.0], np.ones((2, 3))), "weights"),
    ],
)
def test_bootstrap_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------- coverage


@pytest.mark.slow
def test_coverage_binormal_independent_images():
    """Binormal model, negatives N(0, 1), positives N(1.2, 1): AUROC = Phi(1.2 / sqrt 2) (~0.80)."""
    mu, sims = 1.2, 200
    true = norm.cdf(mu / math.sqrt(2))
    rng = np.random.default_rng(2024)
    labels = np.r_[np.zeros(50), np.ones(50)]
    covered = np.zeros(2)
    for i in range(sims):
        scores = np.r_[rng.normal(size=50), rng.normal(mu, 1, size=50)]
        cis = (auroc_ci(labels, scores), auroc_bootstrap_ci(labels, scores, None, n_boot=1000, seed=i))
        for j, ci in enumerate(cis):
            covered[j] += ci.low <= true <= ci.high
    delong, boot = covered / sims
    assert 0.90 <= delong <= 0.98, delong
    assert 0.90 <= boot <= 0.98, boot


@pytest.mark.slow
def test_coverage_with_correlated_images_per_patient():
    """50 patients x 4 pairs; a patient-level susceptibility v_p ~ N(0, 1) shifts all its adversarial
    scores (clean N(0, 1), adversarial N(1.2 + v_p, 1)): AUROC = Phi(1.2 / sqrt 3). DeLong, which treats
    the 400 images as independent, under-covers; the patient bootstrap does not."""
    mu, patients, k, sims = 1.2, 50, 4, 200
    true = norm.cdf(mu / math.sqrt(3))
    rng = np.random.default_rng(7)
    groups = np.tile(np.repeat(np.arange(patients), k), 2)
    labels = np.r_[np.zeros(patients * k), np.ones(patients * k)]
    covered = np.zeros(2)
    for i in range(sims):
        v = rng.normal(size=patients)
        scores = np.r_[rng.normal(size=patients * k), mu + v[groups[: patients * k]] + rng.normal(size=patients * k)]
        cis = (auroc_ci(labels, scores), auroc_bootstrap_ci(labels, scores, groups, n_boot=1000, seed=i))
        for j, ci in enumerate(cis):
            covered[j] += ci.low <= true <= ci.high
    delong, boot = covered / sims
    assert 0.88 <= boot <= 0.98, boot
    assert delong < 0.88 and delong < boot - 0.05, (delong, boot)
