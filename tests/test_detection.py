"""Adversarial detection: grouped split, detectors, baselines, saved runs and transfer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from causal_ie.attacks.detection import (
    DetectionData,
    DetectionResult,
    detect,
    evaluate_detector,
    features_matrix,
    fit_detector,
    load_detection_data,
    save_detection_data,
    split_halves,
    tpr_at_fpr,
    transfer_auroc,
    transfer_matrix,
)
from causal_ie.attacks.detectors import max_prob, prediction_change_under_noise

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ("logistic", "gbm")


def patient_groups(n_patients: int, sizes: list[int] | None = None) -> list[str]:
    sizes = sizes or [4] * n_patients
    return [f"p{g}" for g in range(n_patients) for _ in range(sizes[g])]


def shifted_pairs(n: int, f: int = 3, shift: float = 3.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, f)), rng.standard_normal((n, f)) + shift


# ----------------------------------------------------------------------------- split


def test_split_halves_keeps_groups_together_and_balanced():
    sizes = [1, 5, 2, 3, 7, 1, 4, 2, 6, 3, 2, 4]
    groups = patient_groups(len(sizes), sizes)
    n = len(groups)
    for seed in range(5):
        train = split_halves(groups, seed)
        assert train.dtype == bool and train.shape == (n,)
        for g in set(groups):
            sides = {bool(t) for gg, t in zip(groups, train) if gg == g}
            assert len(sides) == 1, f"patient {g} is split across halves"
        # greedy assignment: the halves differ by at most one group's size
        assert abs(int(train.sum()) - n / 2) <= max(sizes) / 2
        assert 0 < train.sum() < n


def test_split_halves_deterministic_and_seed_dependent():
    groups = patient_groups(10)
    np.testing.assert_array_equal(split_halves(groups, 3), split_halves(groups, 3))
    splits = {tuple(split_halves(groups, seed)) for seed in range(6)}
    assert len(splits) > 1


def test_split_halves_does_not_depend_on_image_order():
    groups = patient_groups(8, [1, 2, 3, 4, 1, 2, 3, 4])
    order = np.random.default_rng(0).permutation(len(groups))
    shuffled = [groups[i] for i in order]
    np.testing.assert_array_equal(split_halves(shuffled, 1), split_halves(groups, 1)[order])


def test_split_halves_two_groups_and_too_few():
    assert sorted(split_halves(["a", "a", "b"], 0).tolist()) in ([False, False, True], [False, True, True])
    with pytest.raises(ValueError, match="2 distinct"):
        split_halves(["a", "a", "a"])
    with pytest.raises(ValueError, match="2 distinct"):
        split_halves([])


# ----------------------------------------------------------------------------- tpr_at_fpr


def test_tpr_at_fpr_hand_made():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.4, 0.5, 0.9, 0.95])
    # threshold 0.9: TPR 2/4 at FPR 0; threshold 0.4: TPR 4/4 at FPR 1/4 (the negative 0.8)
    assert tpr_at_fpr(labels, scores, 0.05) == 0.5
    assert tpr_at_fpr(labels, scores, 0.0) == 0.5
    assert tpr_at_fpr(labels, scores, 0.24) == 0.5
    assert tpr_at_fpr(labels, scores, 0.25) == 1.0
    with pytest.raises(ValueError, match="both classes"):
        tpr_at_fpr(np.zeros(3), np.arange(3.0))


# ----------------------------------------------------------------------------- detect


@pytest.mark.parametrize("kind", KINDS)
def test_leak_identical_features_give_exactly_half(kind):
    """Adversarial rows that copy their clean twins: every held-out score pair ties.

    The held-out adversarial scores are then the same multiset as the clean ones,
    so P(adv > clean) = P(clean > adv) over all (clean, adv) pairs and the AUROC
    is exactly 0.5 for *any* detector. Anything else means the detector sees
    something besides the features (labels, row order, ...).
    """
    clean = np.random.default_rng(0).standard_normal((48, 3))
    result = detect(clean, clean.copy(), patient_groups(12), seed=0, kind=kind)
    assert result.auroc == pytest.approx(0.5, abs=1e-12)
    assert result.n_train + result.n_test == 48


def test_leak_patient_memorisation_does_not_transfer_to_new_patients():
    """Per-patient signatures: a GBM can memorise them, but only a leaky split rewards that.

    Each patient has its own feature level and its own random direction of the
    attack shift, so nothing generalises across patients. The grouped split of
    `detect` must score ~chance; the same detector on a random per-image split
    (patients in both halves) scores near 1, which shows the test can fail.
    """
    rng = np.random.default_rng(0)
    n_patients, per_patient = 12, 16
    patient = np.repeat(np.arange(n_patients), per_patient)
    direction = rng.choice([-1.0, 1.0], size=n_patients)
    clean = (10.0 * patient + 0.1 * rng.standard_normal(len(patient)))[:, None]
    adv = clean + 3.0 * direction[patient][:, None]
    grouped = detect(clean, adv, patient_groups(n_patients, [per_patient] * n_patients), seed=0, kind="gbm")
    assert grouped.auroc < 0.7
    leaky_train = rng.random(len(patient)) < 0.5
    leaky = evaluate_detector(fit_detector(clean, adv, leaky_train, kind="gbm"), clean, adv, ~leaky_train)
    assert leaky.auroc > 0.9


@pytest.mark.parametrize("kind", KINDS)
def test_shifted_features_are_detected(kind):
    clean, adv = shifted_pairs(60)
    result = detect(clean, adv, patient_groups(15), seed=0, kind=kind)
    assert isinstance(result, DetectionResult)
    assert result.auroc > 0.95
    assert result.tpr_at_5fpr > 0.5
    assert result.fpr[0] == 0 and result.tpr[-1] == 1 and len(result.fpr) == len(result.tpr)


@pytest.mark.parametrize("kind", KINDS)
def test_auroc_matches_sklearn_on_held_out_predictions(kind):
    clean, adv = shifted_pairs(40, shift=0.7, seed=1)  # overlapping classes: AUROC strictly inside (0.5, 1)
    groups = patient_groups(10)
    train = split_halves(groups, 2)
    estimator = fit_detector(clean, adv, train, kind=kind, seed=2)
    test = ~train
    x = np.concatenate([clean[test], adv[test]])
    y = np.r_[np.zeros(test.sum()), np.ones(test.sum())]
    scores = estimator.predict_proba(x)[:, 1]
    expected = roc_auc_score(y, scores)
    result = detect(clean, adv, groups, seed=2, kind=kind)
    assert result.auroc == pytest.approx(expected, abs=1e-12)
    assert 0.5 < result.auroc < 1.0
    assert result.tpr_at_5fpr == tpr_at_fpr(y, scores, 0.05)
    assert (result.n_train, result.n_test) == (int(train.sum()), int(test.sum()))
    assert result.as_dict() == {
        "auroc": result.auroc,
        "tpr@5fpr": result.tpr_at_5fpr,
        "n_train": train.sum(),
        "n_test": test.sum(),
    }


@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_features_do_not_crash(kind):
    clean, adv = shifted_pairs(40)
    clean[::3, 0] = np.nan
    adv[1::4, 1] = np.inf
    adv[:, 2] = np.nan  # a feature that is never defined on attacked images
    result = detect(clean, adv, patient_groups(10), kind=kind)
    assert np.isfinite(result.auroc) and result.auroc > 0.9


def test_one_dimensional_features_are_one_feature():
    clean, adv = shifted_pairs(40, f=1)
    a = detect(clean[:, 0], adv[:, 0], patient_groups(10))
    b = detect(clean, adv, patient_groups(10))
    assert a.auroc == b.auroc


def test_detect_validation():
    clean, adv = shifted_pairs(8)
    with pytest.raises(ValueError, match="estimator must be one of"):
        detect(clean, adv, patient_groups(2), kind="svm")
    with pytest.raises(ValueError, match="same shape"):
        detect(clean, adv[:, :2], patient_groups(2))
    with pytest.raises(ValueError, match="groups"):
        detect(clean, adv, patient_groups(3))
    with pytest.raises(ValueError, match="train"):
        fit_detector(clean, adv, np.zeros(8, dtype=bool))


def test_features_matrix():
    x, names = features_matrix({"b": torch.tensor([1.0, 2.0]), "a": np.array([3, 4])})
    assert names == ["b", "a"]
    assert x.dtype == np.float64
    np.testing.assert_array_equal(x, [[1.0, 3.0], [2.0, 4.0]])
    with pytest.raises(ValueError, match="same length"):
        features_matrix({"a": np.zeros(2), "b": np.zeros(3)})
    with pytest.raises(ValueError, match="1-D"):
        features_matrix({"a": np.zeros((2, 2))})


# ----------------------------------------------------------------------------- baselines


class Constant(nn.Module):
    """Logits that ignore the input."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([0.3, -1.0, 2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], -1)


def tiny_linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).eval()


def images() -> torch.Tensor:
    return torch.rand(5, 2, 4, 4, generator=torch.Generator().manual_seed(0))


def test_noise_score_zero_cases():
    x = images()
    assert torch.equal(prediction_change_under_noise(tiny_linear(), x, std=0.0), torch.zeros(5))
    assert torch.equal(prediction_change_under_noise(Constant(), x, std=0.1), torch.zeros(5))


def test_noise_score_linear_model_matches_reference():
    model, x = tiny_linear(), images()
    std, draws, seed = 0.05, 3, 7
    score = prediction_change_under_noise(model, x, std=std, draws=draws, seed=seed)
    assert score.shape == (5,) and (score > 0).all()
    # reference: the same noise stream, written out with the definition
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        base = torch.sigmoid(model(x))
        changes = [
            (torch.sigmoid(model((x + std * torch.randn(x.shape, generator=gen)).clamp(0, 1))) - base).abs().mean(1)
            for _ in range(draws)
        ]
    torch.testing.assert_close(score, torch.stack(changes).mean(0))
    # seeded: reproducible; another seed gives another draw
    assert torch.equal(score, prediction_change_under_noise(model, x, std=std, draws=draws, seed=seed))
    assert not torch.equal(score, prediction_change_under_noise(model, x, std=std, draws=draws, seed=seed + 1))


def test_noise_score_no_grad_and_validation():
    model, x = tiny_linear(), images().requires_grad_()
    assert not prediction_change_under_noise(model, x).requires_grad
    with pytest.raises(ValueError, match="std"):
        prediction_change_under_noise(model, x, std=-0.1)
    with pytest.raises(ValueError, match="draws"):
        prediction_change_under_noise(model, x, draws=0)


def test_max_prob():
    probs = torch.tensor([[0.1, 0.7, 0.2], [0.9, 0.05, 0.3]])
    torch.testing.assert_close(max_prob(probs), torch.tensor([0.7, 0.9]))
    with pytest.raises(ValueError, match="probs"):
        max_prob(torch.rand(3))


# ----------------------------------------------------------------------------- saved runs, transfer


def make_run(shift: float, seed: int, names: tuple[str, ...] = ("f0", "f1", "f2"), n_patients: int = 10) -> DetectionData:
    groups = patient_groups(n_patients)
    clean, adv = shifted_pairs(len(groups), f=len(names), shift=shift, seed=seed)
    ids = [f"img{i}" for i in range(len(groups))]
    return DetectionData(clean, adv, list(names), ids, groups, seed)


def test_save_load_round_trip(tmp_path):
    data = make_run(1.0, 3)
    data.features_adv[0, 1] = np.nan
    path = save_detection_data(tmp_path / "sub" / "detection.npz", data)
    assert path == tmp_path / "sub" / "detection.npz"
    assert [p.name for p in path.parent.iterdir()] == ["detection.npz"]  # no temp file left behind
    loaded = load_detection_data(path)
    np.testing.assert_array_equal(loaded.features_clean, data.features_clean)
    np.testing.assert_array_equal(loaded.features_adv, data.features_adv)  # NaN == NaN here
    assert loaded.feature_names == data.feature_names
    assert loaded.ids == data.ids and loaded.groups == data.groups and loaded.seed == 3


def test_load_errors(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_detection_data(missing)
    partial = tmp_path / "partial.npz"
    np.savez_compressed(partial, features_clean=np.zeros((2, 1)), features_adv=np.zeros((2, 1)))
    with pytest.raises(ValueError, match=r"partial\.npz.*groups"):
        load_detection_data(partial)


def test_detection_data_validation():
    with pytest.raises(ValueError, match="feature_names"):
        DetectionData(np.zeros((2, 2)), np.zeros((2, 2)), ["a"], ["i", "j"], ["p", "q"], 0)
    with pytest.raises(ValueError, match="groups"):
        DetectionData(np.zeros((2, 2)), np.zeros((2, 2)), ["a", "b"], ["i", "j"], ["p"], 0)


def test_transfer_matrix():
    a, b = make_run(1.0, 0), make_run(2.0, 1)
    table = transfer_matrix({"a": a, "b": b})
    assert list(table.index) == ["a", "b"] and list(table.columns) == ["a", "b"]
    assert table.loc["a", "a"] == detect(a.features_clean, a.features_adv, a.groups, seed=0).auroc
    assert table.loc["b", "b"] == detect(b.features_clean, b.features_adv, b.groups, seed=1).auroc
    # off-diagonal by hand: a's detector on b's images of patients outside a's train half
    train_a = split_halves(a.groups, a.seed)
    estimator = fit_detector(a.features_clean, a.features_adv, train_a, seed=a.seed)
    seen = {g for g, t in zip(a.groups, train_a) if t}
    unseen = np.array([g not in seen for g in b.groups])
    x = np.concatenate([b.features_clean[unseen], b.features_adv[unseen]])
    y = np.r_[np.zeros(unseen.sum()), np.ones(unseen.sum())]
    expected = roc_auc_score(y, estimator.predict_proba(x)[:, 1])
    assert table.loc["a", "b"] == pytest.approx(expected, abs=1e-12)
    assert transfer_auroc(a, b) == table.loc["a", "b"]


def test_transfer_without_unseen_patients_is_nan():
    source = make_run(1.0, 0)
    train = split_halves(source.groups, source.seed)
    keep = np.flatnonzero(train)  # the target holds only patients the source detector trained on
    target = DetectionData(
        source.features_clean[keep],
        source.features_adv[keep],
        source.feature_names,
        [source.ids[i] for i in keep],
        [source.groups[i] for i in keep],
        5,
    )
    assert np.isnan(transfer_auroc(source, target))


def test_transfer_with_different_features_raises():
    a, b = make_run(1.0, 0), make_run(1.0, 1, names=("f0", "g1", "f2"))
    with pytest.raises(ValueError, match=r"\['f0', 'f1', 'f2'\].*\['f0', 'g1', 'f2'\]"):
        transfer_auroc(a, b)
    with pytest.raises(ValueError, match="same features"):
        transfer_matrix({"a": a, "b": b})


def test_per_image_noise_seeds_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    images = torch.rand(4, 1, 4, 4)
    seeds = [11, 12, 13, 14]
    whole = prediction_change_under_noise(model, images, std=0.1, draws=3, seed=seeds)
    halves = torch.cat(
        [
            prediction_change_under_noise(model, images[:2], std=0.1, draws=3, seed=seeds[:2]),
            prediction_change_under_noise(model, images[2:], std=0.1, draws=3, seed=seeds[2:]),
        ]
    )
    torch.testing.assert_close(whole, halves)
    assert (whole > 0).all()
    with pytest.raises(ValueError, match="one per image"):
        prediction_change_under_noise(model, images, seed=[1, 2])
