"""The joint adaptive attacker: its logit over several detectors, EOT, and the detectors' gradients (BPDA)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from causal_ie.attacks.adaptive import AdaptivePGD, logistic_logit
from causal_ie.attacks.detection import fit_detector
from causal_ie.attacks.detection_study import DetectorRow
from causal_ie.attacks.detectors import (
    CEDetector,
    Detector,
    FeatureSqueezingDetector,
    MaxProbDetector,
    NoiseFlipDetector,
    bit_depth_squeeze,
    feature_squeezing_score,
    median_squeeze,
    prediction_change_under_noise,
)
from causal_ie.attacks.detectors.lid import LocalIntrinsicDimensionality
from causal_ie.attacks.detectors.mahalanobis import MahalanobisDistance
from causal_ie.attacks.joint_logit import JointDetectorLogit

pytestmark = pytest.mark.usefixtures("one_thread")


def linear(dtype=torch.float32) -> nn.Module:
    """Logits of 1x2x2 images: z = W x + b (two findings)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).to(dtype)
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 2.0, -1.0, 0.5], [-1.0, 0.0, 0.0, 1.0]]))
        model[1].bias.copy_(torch.tensor([0.0, 0.25]))
    return model.eval()


def conv() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(16, 3)).eval()


def row(name: str, detector: Detector, features) -> DetectorRow:
    return DetectorRow(name, detector, tuple((name, f) for f in features), False)


def fitted_on(detector: Detector, model: nn.Module, images: torch.Tensor, seed: int = 0):
    """A logistic estimator fitted on the detector's features of clean images vs noisier copies."""
    noisy = (images + 0.2 * torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))).clamp(0, 1)
    index = torch.arange(len(images))
    feats = [detector.features(model, x, model(x).sigmoid().detach(), index) for x in (images, noisy)]
    names = list(feats[0])
    clean, adv = (np.stack([f[n].detach().double().numpy() for n in names], 1) for f in feats)
    return fit_detector(clean, adv, np.ones(len(images), dtype=bool)), names


def test_joint_logit_of_one_detector_is_its_margin_and_reproduces_the_single_detector_attack():
    """against=ce: attacking the joint logit with threshold 0 is attacking the detector's own
    logit with threshold tau, iterate for iterate (the study before the joint attacker)."""
    model = conv()
    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    detector = CEDetector(grids=[2], baselines=["zero"], latent_layer=None, nearest=1)
    estimator, names = fitted_on(detector, model, images)
    tau = 0.3
    joint = JointDetectorLogit(model, {"ce": detector}, {"ce": row("ce", detector, names)}, {"ce": estimator},
                               {"ce": tau}, ["ce"])
    raw_logit = logistic_logit(estimator)

    def raw(x):
        features = detector.features(model, x, None, None, differentiable=True)
        return raw_logit(torch.stack([features[n] for n in names], dim=1))

    x = images.clone().requires_grad_(True)
    (g_joint,) = torch.autograd.grad(joint(x).sum(), x)
    x2 = images.clone().requires_grad_(True)
    value = raw(x2)
    (g_raw,) = torch.autograd.grad(value.sum(), x2)
    torch.testing.assert_close(joint(images).detach(), value.detach() - tau, rtol=0, atol=1e-6)
    torch.testing.assert_close(g_joint, g_raw, rtol=0, atol=1e-7)
    labels = (model(images) > 0).float()
    common = dict(eps=0.05, steps=3, seed=0, weight=[0.01, 1.0], selective=True, batch_size=4)
    a = AdaptivePGD(joint, threshold=0.0, **common)(model, images, labels, 0)
    b = AdaptivePGD(raw, threshold=tau, **common)(model, images, labels, 0)
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=1e-6)
    assert torch.equal(a.success, b.success) and torch.equal(a.runs, b.runs)


class Shift(Detector):
    """A detector with one feature, a fixed linear function of the pixels (for hand gradients)."""

    differentiable = True

    def __init__(self, weights):
        super().__init__()
        self.w = torch.tensor(weights)

    def features(self, classifier, images, probs, index, differentiable=False):
        return {"s": images.flatten(1) @ self.w}


def test_joint_logit_is_the_largest_margin_and_steps_on_every_detector_that_still_flags():
    model = linear()
    a, b = Shift([1.0, 0.0, 0.0, 0.0]), Shift([0.0, 0.0, 2.0, 1.0])
    # identity "estimators": the logit is the feature itself
    ident = fit_detector(np.array([[-1.0], [-2.0]]), np.array([[1.0], [2.0]]), np.ones(2, dtype=bool))
    logit = logistic_logit(ident)
    rows = {"a": row("a", a, ["s"]), "b": row("b", b, ["s"])}
    joint = JointDetectorLogit(model, {"a": a, "b": b}, rows, {"a": ident, "b": ident}, {"a": 0.1, "b": 0.2}, ["a", "b"])
    x = torch.tensor([[0.9, 0.0, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0], [0.9, 0.0, 0.0, 0.0]]).reshape(3, 1, 2, 2)
    margins = torch.stack([logit((x.flatten(1) @ d.w)[:, None]) - t for d, t in ((a, 0.1), (b, 0.2))], 1)
    x = x.requires_grad_(True)
    value = joint(x)
    torch.testing.assert_close(value.detach(), margins.amax(1))
    (grad,) = torch.autograd.grad(value.sum(), x)
    slope = float(ident[-1].coef_[0, 0] / ident[-2].scale_[0])  # d logit / d feature
    flagging = margins > 0
    # image 0: both flag -> both gradients; image 1: none flags -> the larger margin's (a: the lower
    # threshold, same feature 0); image 2: only a
    assert flagging.tolist() == [[True, True], [False, False], [True, False]]
    expected = torch.stack([a.w + b.w, a.w, a.w]) * slope
    torch.testing.assert_close(grad.flatten(1), expected)


class Counting(Detector):
    differentiable = True
    randomised = True

    def __init__(self):
        super().__init__()
        self.calls = 0

    def features(self, classifier, images, probs, index, differentiable=False):
        self.calls += 1
        return {"s": images.flatten(1).sum(1) + self.calls}  # a different draw each call


def test_randomised_detectors_are_averaged_over_eot_samples_per_call():
    model, detector = linear(), Counting()
    ident = fit_detector(np.array([[-1.0], [-2.0]]), np.array([[1.0], [2.0]]), np.ones(2, dtype=bool))
    joint = JointDetectorLogit(model, {"r": detector}, {"r": row("r", detector, ["s"])}, {"r": ident}, {"r": 0.0},
                               ["r"], eot_samples=5)
    x = torch.zeros(2, 1, 2, 2)
    features = joint.features(x)
    assert detector.calls == 5
    torch.testing.assert_close(features["r"]["s"], torch.full((2,), 3.0))  # mean of 1..5


def test_feature_squeezing_gradient_is_bpda_with_the_identity():
    """d/dx max_s |sigma(Wx + b) - sigma(W s(x) + b)|_1 with ds/dx := identity, by hand for a
    linear classifier (one squeezer at a time, so no max to break ties)."""
    model = linear(torch.float64)
    x = torch.tensor([[0.13, 0.52, 0.77, 0.31], [0.9, 0.05, 0.44, 0.61]], dtype=torch.float64).reshape(2, 1, 2, 2)
    w, b = model[1].weight.detach(), model[1].bias.detach()
    for bits, median, squeeze in ((3, None, lambda v: bit_depth_squeeze(v, 3)), (None, 2, lambda v: median_squeeze(v, 2))):
        xg = x.clone().requires_grad_(True)
        score = feature_squeezing_score(model, xg, bits, median, differentiable=True)
        torch.testing.assert_close(score.detach(), feature_squeezing_score(model, x, bits, median))
        (grad,) = torch.autograd.grad(score.sum(), xg)
        p, q = torch.sigmoid(x.flatten(1) @ w.T + b), torch.sigmoid(squeeze(x).flatten(1) @ w.T + b)
        sign = torch.sign(p - q)
        expected = (sign * p * (1 - p)) @ w - (sign * q * (1 - q)) @ w
        torch.testing.assert_close(grad.flatten(1), expected)
    assert FeatureSqueezingDetector.differentiable


def test_noise_flip_max_prob_and_penultimate_distances_differentiate_to_their_values():
    model = linear(torch.float64)
    x = torch.rand(5, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 0.8 + 0.1
    # noise_flip: the same noise gives the same value; the gradient is the finite-difference one
    value = prediction_change_under_noise(model, x, std=0.05, draws=3, seed=7)
    xg = x.clone().requires_grad_(True)
    torch.testing.assert_close(prediction_change_under_noise(model, xg, std=0.05, draws=3, seed=7, differentiable=True).detach(), value)
    # (the probabilities are float32 inside, so a central difference with a float32-sized step)
    score = prediction_change_under_noise(model, xg, std=0.05, draws=3, seed=7, differentiable=True)
    (grad,) = torch.autograd.grad(score.sum(), xg)
    v, h = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6)), 1e-3
    central = (prediction_change_under_noise(model, x + h * v, std=0.05, draws=3, seed=7)
               - prediction_change_under_noise(model, x - h * v, std=0.05, draws=3, seed=7)) / (2 * h)
    torch.testing.assert_close((grad * v).flatten(1).sum(1), central.double(), rtol=1e-3, atol=2e-4)
    # the detector's own attacker calls draw fresh noise each time (what EOT averages over)
    noise = NoiseFlipDetector(std=0.05, draws=2, seed=0)
    first, second = (noise.features(model, x, None, None, differentiable=True)["score"] for _ in range(2))
    assert not torch.equal(first, second)
    # max_prob: sigma'(z_max) W_max
    mp = MaxProbDetector().features(model, xg, None, None, differentiable=True)["score"]
    (grad,) = torch.autograd.grad(mp.sum(), xg)
    z = x.flatten(1) @ model[1].weight.T + model[1].bias
    top = z.argmax(1)
    s = torch.sigmoid(z.gather(1, top[:, None]))
    torch.testing.assert_close(grad.flatten(1), s * (1 - s) * model[1].weight[top].detach())
    # Mahalanobis and LID on features: the torch scores equal the numpy ones and pass gradcheck
    reference = torch.rand(40, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    feats = torch.rand(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    maha = MahalanobisDistance().fit(reference)
    torch.testing.assert_close(maha.differentiable_score(feats).detach(), maha.score(feats.detach()))
    assert torch.autograd.gradcheck(maha.differentiable_score, (feats,))
    lid = LocalIntrinsicDimensionality(k=5).fit(reference)
    torch.testing.assert_close(lid.differentiable_score(feats).detach(), lid.score(feats.detach()))
    assert torch.autograd.gradcheck(lid.differentiable_score, (feats,))


def test_shifted_grids_tile_the_image_once_and_ce_random_draws_per_image_and_call():
    from causal_ie.attacks.detectors import CERandomDetector
    from causal_ie.interventions.windows import ShiftedWindowGrid

    rng = np.random.default_rng(0)
    for _ in range(20):  # every pixel in exactly one window, whatever the origin
        h, w, win = int(rng.integers(5, 20)), int(rng.integers(5, 20)), int(rng.integers(1, 5))
        origin = (int(rng.integers(win)), int(rng.integers(win)))
        grid = ShiftedWindowGrid.shifted((h, w), win, origin)
        covered = torch.zeros(h * w)
        for window in grid.pixel_index(torch.arange(len(grid))):
            covered[window.unique()] += 1
        assert torch.equal(covered, torch.ones(h * w)), (h, w, win, origin)
    with pytest.raises(ValueError, match="origin must lie in"):
        ShiftedWindowGrid.shifted((8, 8), 4, (4, 0))
    model = conv()
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    detector = CERandomDetector(grids=[2], baselines=["zero", "blur"], nearest=1, seed=3)
    whole = detector.features(model, images, None, torch.arange(4))
    # the defender's draw follows the image's index, not the batch it comes in
    part = detector.features(model, images[2:], None, torch.tensor([2, 3]))
    for name in whole:
        torch.testing.assert_close(whole[name][2:], part[name])
    other = CERandomDetector(grids=[2], baselines=["zero", "blur"], nearest=1, seed=4).features(model, images, None, torch.arange(4))
    assert any(not torch.equal(whole[n], other[n]) for n in whole)
    # the attacker's calls draw afresh and carry gradients
    x = images.clone().requires_grad_(True)
    draws = [detector.features(model, x, None, None, differentiable=True) for _ in range(3)]
    assert any(not torch.equal(draws[0]["g2.max.max"], d["g2.max.max"]) for d in draws[1:])
    (grad,) = torch.autograd.grad(sum(d["g2.l1.mean"].sum() for d in draws), x)
    assert grad.abs().sum() > 0
