"""Standard adversarial-example detectors: feature squeezing, penultimate features, Mahalanobis, LID."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import median_filter
from sklearn.covariance import LedoitWolf
from torch import nn

from causal_ie.attacks.detectors import (
    LocalIntrinsicDimensionality,
    MahalanobisDistance,
    bit_depth_squeeze,
    classifier_layer,
    feature_squeezing_score,
    features_and_logits,
    median_squeeze,
    penultimate_features,
)
from causal_ie.models.classifier import Classifier

pytestmark = pytest.mark.usefixtures("one_thread")


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


@pytest.fixture
def linear_model() -> nn.Module:
    """Logits of a 1x2x2 image: z1 = x00 + 2 x01 - x10 + 0.5 x11, z2 = -x00 + x11 + 0.25."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 2.0, -1.0, 0.5], [-1.0, 0.0, 0.0, 1.0]]))
        model[1].bias.copy_(torch.tensor([0.0, 0.25]))
    return model


def probs(x00, x01, x10, x11):
    return sigmoid(x00 + 2 * x01 - x10 + 0.5 * x11), sigmoid(-x00 + x11 + 0.25)


# ----------------------------------------------------------------------------- feature squeezing


def test_feature_squeezing_by_hand(linear_model):
    image = torch.tensor([[[[0.1, 0.52], [0.9, 0.33]]]])
    p = probs(0.1, 0.52, 0.9, 0.33)
    # 1 bit: round(x) -> [[0, 1], [1, 0]]
    q_bits = probs(0.0, 1.0, 1.0, 0.0)
    # 2x2 median, window = pixel and its upper/left neighbours, edge repeated, upper median:
    # (0,0): {.1,.1,.1,.1} -> .1; (0,1): {.1,.52,.1,.52} -> .52; (1,0): {.1,.1,.9,.9} -> .9;
    # (1,1): {.1,.52,.9,.33} -> .52
    q_median = probs(0.1, 0.52, 0.9, 0.52)
    l1_bits = sum(abs(a - b) for a, b in zip(p, q_bits))
    l1_median = sum(abs(a - b) for a, b in zip(p, q_median))
    assert l1_bits != pytest.approx(l1_median)
    score = feature_squeezing_score(linear_model, image, bit_depth=1, median_size=2)
    assert score.shape == (1,) and score.dtype == torch.float32
    assert score.item() == pytest.approx(max(l1_bits, l1_median), abs=1e-6)
    bits_only = feature_squeezing_score(linear_model, image, bit_depth=1, median_size=None)
    median_only = feature_squeezing_score(linear_model, image, bit_depth=None, median_size=2)
    assert (bits_only.item(), median_only.item()) == pytest.approx((l1_bits, l1_median), abs=1e-6)


def test_bit_depth_squeeze_keeps_an_image_at_that_depth(linear_model):
    levels = torch.randint(0, 32, (3, 1, 2, 2))
    image = levels / 31.0  # already 5 bits
    assert torch.equal(bit_depth_squeeze(image, 5), image)
    assert not torch.equal(bit_depth_squeeze(image, 4), image)
    score = feature_squeezing_score(linear_model, image, bit_depth=5, median_size=None)
    assert torch.equal(score, torch.zeros(3))


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
def test_median_squeeze_equals_scipy(size):
    images = torch.rand(2, 3, 6, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(size))
    expected = median_filter(images.numpy(), size=(1, 1, size, size), mode="reflect")
    assert np.array_equal(median_squeeze(images, size).numpy(), expected)


def test_feature_squeezing_restores_mode_and_needs_no_grad():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 8 * 8, 3))
    model.train()
    model[1].eval()  # a caller's per-module mode comes back as it was
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    before = model[1].running_mean.clone()
    score = feature_squeezing_score(model, images)
    assert model.training and not model[1].training and model[0].training
    assert torch.equal(model[1].running_mean, before)  # ran in eval mode
    assert not score.requires_grad
    assert ((score >= 0) & (score <= 3)).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(images=torch.rand(1, 2, 2)), "images must be a floating torch.Tensor \\[N, C, H, W\\]"),
        (dict(images=torch.full((1, 1, 2, 2), 1.5)), "images must be in \\[0, 1\\]"),
        (dict(bit_depth=0), "bit_depth"),
        (dict(median_size=3), "median_size"),
        (dict(bit_depth=None, median_size=None), "at least one squeezer"),
    ],
)
def test_feature_squeezing_bad_input(linear_model, kwargs, match):
    args = dict(images=torch.rand(1, 1, 2, 2), bit_depth=5, median_size=2) | kwargs
    with pytest.raises(ValueError, match=match):
        feature_squeezing_score(linear_model, **args)


# ----------------------------------------------------------------------------- penultimate features


def test_penultimate_features_of_the_classifier_equal_timm_pre_logits():
    torch.manual_seed(0)
    model = Classifier(backbone="test_resnet", image_size=32).train()
    images = torch.rand(3, 1, 32, 32)
    features, logits = features_and_logits(model, images)
    assert model.training and model.backbone.training  # mode restored
    assert classifier_layer(model) is model.backbone.get_classifier()
    assert not model.backbone.get_classifier()._forward_pre_hooks
    model.eval()
    with torch.no_grad():
        backbone = model.backbone
        expected = backbone.forward_head(backbone.forward_features(model.normalize(images)), pre_logits=True)
        assert torch.equal(features, expected)
        assert torch.equal(logits, model(images))
    assert torch.equal(penultimate_features(model, images), features)
    assert features.shape == (3, backbone.num_features)


def test_hook_is_removed_after_an_error():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Flatten()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            self.fc(self.body(x))
            raise RuntimeError("boom")

    model = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        penultimate_features(model, torch.rand(2, 1, 2, 2))
    assert not model.fc._forward_pre_hooks


def test_plain_model_uses_its_last_linear_and_checks_it_ran_once(linear_model):
    images = torch.rand(5, 1, 2, 2)
    features = penultimate_features(linear_model, images)
    assert torch.equal(features, images.flatten(1))

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.fc(x.flatten(1)))

    twice = Twice()
    with pytest.raises(RuntimeError, match="ran 2 times"):
        penultimate_features(twice, images)
    assert not twice.fc._forward_pre_hooks
    with pytest.raises(ValueError, match="no nn.Linear"):
        penultimate_features(nn.Sequential(nn.Flatten()), images)


# ----------------------------------------------------------------------------- Mahalanobis


@pytest.fixture
def gaussian():
    rng = np.random.default_rng(0)
    cov = np.array([[2.0, 0.6, 0.0], [0.6, 1.0, -0.3], [0.0, -0.3, 0.5]])
    return rng.multivariate_normal([1.0, -2.0, 0.5], cov, size=40), rng.normal(size=(6, 3))


def test_mahalanobis_single_gaussian_equals_direct_computation(gaussian):
    train, test = gaussian
    detector = MahalanobisDistance(covariance="empirical").fit(torch.from_numpy(train))
    mu = train.mean(axis=0)
    inv = np.linalg.inv(np.cov(train.T, bias=True))
    expected = np.array([(x - mu) @ inv @ (x - mu) for x in test])
    score = detector.score(torch.from_numpy(test))
    assert score.dtype == torch.float64 and score.shape == (6,)
    np.testing.assert_allclose(score.numpy(), expected, rtol=1e-9)


def test_mahalanobis_ledoit_wolf_equals_direct_computation(gaussian):
    train, test = gaussian
    detector = MahalanobisDistance().fit(train)
    mu = train.mean(axis=0)
    inv = np.linalg.inv(LedoitWolf().fit(train).covariance_)
    expected = np.array([(x - mu) @ inv @ (x - mu) for x in test])
    np.testing.assert_allclose(detector.score(test).numpy(), expected, rtol=1e-9)


def test_mahalanobis_classes_share_a_covariance_and_take_the_nearest_mean(gaussian):
    train, test = gaussian
    classes = np.array(["a", "b"] * 20)
    train = train + np.where(classes == "a", 0.0, 3.0)[:, None]
    detector = MahalanobisDistance(covariance="empirical").fit(train, classes)
    means = [train[classes == c].mean(axis=0) for c in ("a", "b")]
    residuals = np.concatenate([train[classes == c] - m for c, m in zip(("a", "b"), means)])
    inv = np.linalg.inv(residuals.T @ residuals / len(train))
    expected = np.array([[(x - m) @ inv @ (x - m) for m in means] for x in test])
    np.testing.assert_allclose(detector.distances(test), expected, rtol=1e-9)
    np.testing.assert_allclose(detector.score(test).numpy(), expected.min(axis=1), rtol=1e-9)
    assert detector.classes_.tolist() == ["a", "b"]


def test_mahalanobis_more_dimensions_than_images():
    rng = np.random.default_rng(1)
    train = rng.normal(size=(10, 50))
    with pytest.raises(ValueError, match="singular; use covariance='ledoit_wolf'"):
        MahalanobisDistance(covariance="empirical").fit(train)
    detector = MahalanobisDistance().fit(train)
    far = detector.score(rng.normal(size=(5, 50)) + 5.0)
    near = detector.score(rng.normal(size=(5, 50)))
    assert torch.isfinite(far).all() and (far > near.max()).all()


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: MahalanobisDistance("shrunk"), ValueError, "covariance"),
        (lambda: MahalanobisDistance().fit(np.ones(5)), ValueError, "features must be a non-empty 2-D"),
        (lambda: MahalanobisDistance().fit(np.ones((4, 2)), [0, 1]), ValueError, "classes must be 1-D"),
        (lambda: MahalanobisDistance().fit(np.ones((2, 2)), [0, 1]), ValueError, "more rows"),
        (lambda: MahalanobisDistance().fit(np.eye(4)).score(np.ones((2, 3))), ValueError, "D = 4"),
        (lambda: MahalanobisDistance().score(np.ones((2, 3))), RuntimeError, "fit"),
    ],
)
def test_mahalanobis_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ----------------------------------------------------------------------------- LID


def test_lid_by_hand():
    reference = np.array([[1.0, 0.0], [0.0, 2.0], [-4.0, 0.0], [0.0, -8.0]])
    detector = LocalIntrinsicDimensionality(k=3).fit(reference)
    # from the origin: distances 1, 2, 4 (8 is the 4th) -> LID = 3 / (log 4 + log 2 + log 1)
    points = np.array([[0.0, 0.0], [1.0, 0.0]])
    score = detector.score(points)
    assert score.dtype == torch.float64
    assert score[0].item() == pytest.approx(3 / math.log(8), abs=1e-12)
    assert score[1].item() == 0.0  # a duplicate of a reference point


def test_lid_bad_input():
    with pytest.raises(ValueError, match="k must be"):
        LocalIntrinsicDimensionality(k=0)
    with pytest.raises(ValueError, match="at least k = 5"):
        LocalIntrinsicDimensionality(k=5).fit(np.ones((3, 2)))
    with pytest.raises(RuntimeError, match="fit"):
        LocalIntrinsicDimensionality().score(np.ones((3, 2)))
