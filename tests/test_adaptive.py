"""The adaptive attack (issue #14): plain PGD exactly at weight 0, a known detector evaded, BPDA exact."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchattacks
from torch import nn

from causal_ie.attacks import FindingLogits, MultiLabelAttack
from causal_ie.attacks.adaptive import (
    AdaptiveAdversarial,
    AdaptivePGD,
    bpda,
    logistic_logit,
    straight_through_argmax,
    straight_through_flip,
    straight_through_step,
    straight_through_topk,
)
from causal_ie.interventions import causal_effect
from causal_ie.models import Classifier

pytestmark = pytest.mark.usefixtures("one_thread")

FINDINGS = ("A", "B", "C", "D")


class TinyNet(nn.Module):
    """A small conv net with named findings (inputs in [0, 1]), as in test_attacks."""

    findings = FINDINGS

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64, 4)
        )

    def forward(self, x):
        return 4 * self.net(x - 0.5)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(6, 1, 12, 12, generator=g)
    labels = (torch.rand(6, len(FINDINGS), generator=g) > 0.5).float()
    return images, labels


def mean_intensity(images):
    return images.mean(dim=(1, 2, 3))


# ----------------------------------------------------------------------------- weight 0 = torchattacks


@pytest.mark.parametrize("mode", ["untargeted", "targeted"])
@pytest.mark.parametrize("name,norm,eps", [("pgd", "Linf", 0.05), ("pgdl2", "L2", 0.5)])
def test_weight_zero_is_torchattacks_pgd_bit_for_bit(batch, mode, name, norm, eps):
    images, labels = batch
    model = TinyNet()
    reference = MultiLabelAttack(name, target="B", mode=mode, eps=eps, alpha=None, steps=7, random_start=False)(
        model, images, labels
    )
    attack = AdaptivePGD(mean_intensity, eps=eps, norm=norm, steps=7, weight=0, random_start=False, mode=mode)
    adv = attack(model, images, labels, finding=1)
    assert torch.equal(adv.last, reference.images)  # the PGD trajectory itself
    assert torch.equal(adv.attacked, reference.attacked) and torch.equal(adv.goal, reference.goal)
    assert adv.targeted == reference.targeted
    plain = AdaptivePGD(
        mean_intensity, eps=eps, norm=norm, steps=7, weight=0, random_start=False, mode=mode, keep_best=False
    )(model, images, labels, finding=1)
    assert torch.equal(plain.images, reference.images)


def test_weight_zero_with_one_finding_per_image_is_torchattacks_pgd(batch):
    """Per-image findings as a LongTensor: the same as torchattacks' PGD on FindingLogits(model, finding)."""
    images, labels = batch
    model = TinyNet().eval()
    finding = torch.tensor([0, 3, 1, 1, 2, 0])
    atk = torchattacks.PGD(FindingLogits(model, finding), eps=0.03, alpha=0.01, steps=5, random_start=False)
    reference = atk(images, labels.gather(1, finding[:, None]).squeeze(1).long())
    adv = AdaptivePGD(mean_intensity, eps=0.03, alpha=0.01, steps=5, weight=0, random_start=False)(
        model, images, labels, finding
    )
    assert torch.equal(adv.last, reference)
    assert torch.equal(adv.finding, finding)
    assert adv.attacked.sum(1).eq(1).all() and adv.attacked[torch.arange(6), finding].all()


def test_best_iterate_is_successful_with_the_lowest_detector_logit_seen(batch):
    """keep_best: among the iterates of the trajectory (recomputed here by stopping after t steps:
    the trajectory is deterministic), the successful one with the lowest logit is returned."""
    images, labels = batch
    model = TinyNet().eval()
    steps, eps, alpha = 6, 0.08, 0.03
    best = AdaptivePGD(mean_intensity, eps=eps, alpha=alpha, steps=steps, weight=0, random_start=False)(
        model, images, labels, 1
    )
    iterates = [images] + [
        AdaptivePGD(mean_intensity, eps=eps, alpha=alpha, steps=t, weight=0, random_start=False, keep_best=False)(
            model, images, labels, 1
        ).images
        for t in range(1, steps + 1)
    ]
    with torch.no_grad():
        z = torch.stack([model(x)[:, 1] for x in iterates])  # [T, N]
    d = torch.stack([mean_intensity(x) for x in iterates])
    ok = (torch.sigmoid(z) > 0.5) != (labels[:, 1] > 0.5)
    for i in range(images.shape[0]):
        if ok[:, i].any():
            t = int(torch.where(ok[:, i], d[:, i], torch.tensor(math.inf)).argmin())
            assert best.success[i]
            assert torch.equal(best.images[i], iterates[t][i])
            assert best.detector_logit[i] == d[t, i]
        else:
            assert not best.success[i]
    assert best.success.any()


# ----------------------------------------------------------------------------- a toy detector


class CornerCenterNet(nn.Module):
    """z_0 = 40 (mean of the centre 8x8 - 0.5) + 10 (mean of the top-left 4x4 corner - 0.5) on
    16x16 images; a dropout head (train mode would make the logits random)."""

    findings = ("centre", "other")

    def __init__(self):
        super().__init__()
        weight = torch.zeros(2, 1, 16, 16)
        weight[0, 0, 4:12, 4:12] = 40 / 64
        weight[0, 0, :4, :4] = 10 / 16
        weight[1, 0] = 1 / 256
        self.linear = nn.Linear(256, 2)
        with torch.no_grad():
            self.linear.weight.copy_(weight.flatten(1))
            self.linear.bias.copy_(torch.tensor([-25.0, -0.5]))
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.linear(x.flatten(1)))


def corner_detector(images):
    """The toy 'detector': a bright top-left corner looks adversarial."""
    return 50 * (images[:, :, :4, :4].mean(dim=(1, 2, 3)) - 0.5)


def toy_images(n: int = 10):
    """Images whose finding 0 is absent with logit in [-1.5, -0.5] (all eligible for an untargeted
    attack; an eps of 0.1 on the centre alone moves z_0 by 4)."""
    g = torch.Generator().manual_seed(3)
    x = 0.3 + 0.4 * torch.rand(n, 1, 16, 16, generator=g)
    want = -1.5 + torch.rand(n, generator=g)
    corner = x[:, 0, :4, :4].mean(dim=(1, 2))
    centre = 0.5 + (want - 10 * (corner - 0.5)) / 40
    block = x[:, 0, 4:12, 4:12]
    x[:, 0, 4:12, 4:12] = block - block.mean(dim=(1, 2), keepdim=True) + centre[:, None, None]
    labels = torch.zeros(n, 2)
    return x.clamp(0, 1), labels


def test_adaptive_attack_evades_a_toy_detector_that_plain_pgd_trips():
    model = CornerCenterNet().eval()
    images, labels = toy_images()
    with torch.no_grad():
        assert (model(images)[:, 0] < 0).all()
    plain = MultiLabelAttack("pgd", target="centre", eps=0.1, alpha=None, steps=10, random_start=False)(
        model, images, labels
    )
    with torch.no_grad():
        plain_ok = model(plain.images)[:, 0] > 0
        plain_d = corner_detector(plain.images)
    adaptive = AdaptivePGD(corner_detector, eps=0.1, steps=10, weight=1.0, seed=0)(model, images, labels, 0)
    with torch.no_grad():
        adv_ok = model(adaptive.images)[:, 0] > 0
    assert plain_ok.all()
    assert adv_ok.float().mean() >= 0.8 and torch.equal(adv_ok, adaptive.success)
    torch.testing.assert_close(adaptive.detector_logit, corner_detector(adaptive.images))
    # plain PGD brightens the corner (+0.1 -> logit +5), the adaptive one darkens it (-5)
    assert adaptive.detector_logit.max() < plain_d.min() - 5
    assert (adaptive.images - images).abs().max() <= 0.1 + 1e-6


def test_selective_steps_evade_the_toy_detector_with_no_weight():
    """Bryniarski et al.'s selective PGD: classifier until the flip, detector afterwards."""
    model = CornerCenterNet().eval()
    images, labels = toy_images()
    plain = AdaptivePGD(corner_detector, eps=0.1, steps=10, weight=0, seed=0)(model, images, labels, 0)
    selective = AdaptivePGD(corner_detector, eps=0.1, steps=10, weight=0, selective=True, seed=0)(
        model, images, labels, 0
    )
    assert selective.success.float().mean() >= 0.8
    assert selective.detector_logit.mean() < plain.detector_logit.mean() - 3


def test_lambda_schedule_stops_at_the_smallest_weight_that_evades_and_counts_its_cost():
    model = CornerCenterNet().eval()
    images, labels = toy_images(6)
    calls = []

    def counted(x):
        calls.append(x.shape[0])
        return corner_detector(x)

    attack = AdaptivePGD(counted, eps=0.1, steps=10, weight=(0.0, 1.0, 10.0), threshold=-2.0, batch_size=4, seed=0)
    adv = attack(model, images, labels, 0)
    # weight 0 is plain PGD (corner brighter, logit > 0): no image evades; weight 1 does
    assert adv.success.all() and (adv.detector_logit < -2).all()
    assert torch.equal(adv.weight, torch.full((6,), 1.0, dtype=torch.float64))
    assert torch.equal(adv.runs, torch.full((6,), 2))
    # per run and batch: steps + 1 detector calls (the last iterate is scored too); lambda 10 never ran
    assert calls == [4] * 11 + [2] * 11 + [4] * 11 + [2] * 11
    without = AdaptivePGD(corner_detector, eps=0.1, steps=10, weight=(0.0, 1.0, 10.0), seed=0)(model, images, labels, 0)
    assert torch.equal(without.runs, torch.full((6,), 3))
    assert (without.detector_logit <= adv.detector_logit + 1e-6).all()  # more runs never do worse


# ----------------------------------------------------------------------------- a real CE feature


def test_adaptive_attack_through_a_differentiable_ce_feature():
    """Detector: the largest logit-CE of the attacked finding over 8x8 windows (zero baseline) of a
    tiny timm ResNet. With a lambda schedule the attack succeeds on every image, stays in the ball
    and [0, 1] and leaves that feature lower than plain PGD does."""
    torch.manual_seed(0)
    model = Classifier(backbone="test_resnet", image_size=32).eval()
    images = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    k = 0
    with torch.no_grad():  # an untrained net's logits sit near a constant: move finding k to the boundary
        model.backbone.get_classifier().bias[k] -= model(images)[:, k].mean() - 0.01
        labels = (model(images) > 0).float()

    def ce_feature(x):
        maps = causal_effect(model, x, window=8, stride=8, baseline="zero", outcome="logit", differentiable=True)
        return 100 * maps[:, k].amax(dim=(1, 2))

    eps = 0.03
    plain = MultiLabelAttack("pgd", target=model.findings[k], eps=eps, alpha=None, steps=5, random_start=False)(
        model, images, labels
    )
    # lambda = 1 alone loses the flip on most images here; the schedule keeps the best success
    adv = AdaptivePGD(ce_feature, eps=eps, steps=5, weight=(0.01, 0.1, 1.0), seed=0)(model, images, labels, k)
    assert isinstance(adv, AdaptiveAdversarial)
    assert (adv.images - images).abs().max() <= eps + 1e-6
    assert adv.images.min() >= 0 and adv.images.max() <= 1
    with torch.no_grad():
        plain_feature, adv_feature = ce_feature(plain.images), ce_feature(adv.images)
        assert torch.equal(adv.success, (model(adv.images)[:, k] > 0) != (labels[:, k] > 0))
    torch.testing.assert_close(adv.detector_logit, adv_feature)
    with torch.no_grad():
        assert ((model(plain.images)[:, k] > 0) != (labels[:, k] > 0)).all()
    assert adv.success.all()
    assert adv_feature.mean() < plain_feature.mean() and (adv_feature < plain_feature).sum() >= 3


# ----------------------------------------------------------------------------- the model and the RNG


def test_model_flags_and_gradients_come_back_under_inference_mode():
    model = CornerCenterNet()
    model.train()
    model.drop.eval()  # mixed flags come back per module
    model.linear.bias.requires_grad_(False)
    images = toy_images(4)[0]
    labels = torch.zeros(4, 2)
    detector = nn.Sequential(nn.Flatten(), nn.Linear(256, 1), nn.Flatten(0))
    detector.train()
    with torch.inference_mode():
        adv = AdaptivePGD(detector, eps=0.05, steps=3, weight=1.0)(model, images, labels, 0)
    assert model.training and not model.drop.training and model.linear.training and detector.training
    assert model.linear.weight.requires_grad and not model.linear.bias.requires_grad
    assert all(p.requires_grad for p in detector.parameters())
    assert all(p.grad is None for p in [*model.parameters(), *detector.parameters()])
    assert not adv.images.is_inference()
    # in eval mode (dropout off): the same as attacking the model already in eval mode
    again = AdaptivePGD(detector, eps=0.05, steps=3, weight=1.0)(model.eval(), images, labels, 0)
    assert torch.equal(adv.images, again.images)


def test_random_start_is_seeded_locally_and_independent_of_the_batch_size(batch):
    images, labels = batch
    model = TinyNet().eval()
    state = torch.get_rng_state()
    a = AdaptivePGD(mean_intensity, eps=0.05, steps=4, weight=0.5, seed=7, batch_size=6)(model, images, labels, 2)
    assert torch.equal(torch.get_rng_state(), state)
    b = AdaptivePGD(mean_intensity, eps=0.05, steps=4, weight=0.5, seed=7, batch_size=4)(model, images, labels, 2)
    c = AdaptivePGD(mean_intensity, eps=0.05, steps=4, weight=0.5, seed=8, batch_size=6)(model, images, labels, 2)
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=1e-7)
    assert not torch.equal(a.last, c.last)


@pytest.mark.parametrize("norm,eps", [("Linf", 0.03), ("L2", 0.4)])
def test_every_iterate_stays_in_the_ball_and_the_box(batch, norm, eps):
    images, labels = batch
    model = TinyNet().eval()
    adv = AdaptivePGD(mean_intensity, eps=eps, norm=norm, steps=5, weight=(0.0, 2.0), selective=True, seed=1)(
        model, images, labels
    )
    for x in (adv.images, adv.last):
        delta = (x - images).flatten(1)
        size = delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)
        assert (size <= eps + 1e-6).all()
        assert x.min() >= 0 and x.max() <= 1


def test_targeted_attack_adds_the_finding():
    model = CornerCenterNet().eval()
    images, _ = toy_images(6)
    labels = torch.zeros(6, 2)
    adv = AdaptivePGD(corner_detector, eps=0.1, steps=10, weight=1.0, mode="targeted", to="present")(
        model, images, labels, 0
    )
    assert adv.targeted and (adv.goal[:, 0] == 1).all()
    with torch.no_grad():
        assert torch.equal(adv.success, model(adv.images)[:, 0] > 0)
    assert adv.success.float().mean() >= 0.8


# ----------------------------------------------------------------------------- bad input


def test_a_detector_without_a_graph_or_with_the_wrong_shape_fails_clearly(batch):
    images, labels = batch
    model = TinyNet().eval()
    with pytest.raises(ValueError, match="no autograd graph"):
        AdaptivePGD(lambda x: mean_intensity(x).detach(), eps=0.01, steps=1)(model, images, labels, 0)
    with pytest.raises(ValueError, match=r"one logit per image, shape \[6\]"):
        AdaptivePGD(lambda x: x.mean(dim=(2, 3)), eps=0.01, steps=1)(model, images, labels, 0)
    # weight 0 needs no gradient of the detector: a detached one is fine
    AdaptivePGD(lambda x: mean_intensity(x).detach(), eps=0.01, steps=1, weight=0)(model, images, labels, 0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(eps=1.5), "eps"),
        (dict(eps=-0.1), "eps"),
        (dict(eps=0.1, steps=2.5), "steps"),
        (dict(eps=0.1, alpha=0), "alpha"),
        (dict(eps=0.1, weight=-1), "weight"),
        (dict(eps=0.1, weight=()), "at least one"),
        (dict(eps=0.1, norm="L1"), "norm"),
        (dict(eps=0.1, mode="both"), "mode"),
        (dict(eps=0.1, batch_size=0), "batch_size"),
        (dict(eps=0.1, seed=1.5), "seed"),
    ],
)
def test_bad_settings_fail_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptivePGD(mean_intensity, **kwargs)


def test_bad_calls_fail_clearly(batch):
    images, labels = batch
    model = TinyNet().eval()
    attack = AdaptivePGD(mean_intensity, eps=0.01, steps=1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        attack(model, images * 2, labels, 0)
    with pytest.raises(ValueError, match="labels must be"):
        attack(model, images, labels[:, :2], 0)
    with pytest.raises(ValueError, match="finding indices"):
        attack(model, images, labels, 4)
    with pytest.raises(ValueError, match="LongTensor"):
        attack(model, images, labels, torch.zeros(3, dtype=torch.long))


# ----------------------------------------------------------------------------- BPDA


def test_bpda_forwards_the_true_value_and_backwards_the_surrogate():
    x = torch.tensor([-2.0, -0.1, 0.0, 0.3, 5.0], requires_grad=True)
    value = torch.round(x * 3) / 3  # a staircase: zero gradient almost everywhere
    surrogate = x**3
    out = bpda(value, surrogate)
    assert torch.equal(out, value.detach())
    (grad,) = torch.autograd.grad((out * torch.arange(5.0)).sum(), x)
    assert torch.equal(grad, 3 * x.detach() ** 2 * torch.arange(5.0))
    # exact even where the surrogate is infinite (surrogate + (value - surrogate).detach() would be NaN)
    inf = bpda(torch.tensor([1.0]), torch.tensor([math.inf], requires_grad=True))
    assert torch.equal(inf, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="same shape"):
        bpda(value, surrogate[:2])


def test_straight_through_step_is_an_exact_indicator_with_a_sigmoid_gradient():
    z = torch.tensor([-3.0, -1e-9, 0.0, 1e-9, 2.0], dtype=torch.float64, requires_grad=True)
    t = 0.5
    out = straight_through_step(z, temperature=t)
    assert torch.equal(out, torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0], dtype=torch.float64))
    (grad,) = torch.autograd.grad(out.sum(), z)
    s = torch.sigmoid(z.detach() / t)
    torch.testing.assert_close(grad, s * (1 - s) / t, rtol=0, atol=1e-15)


def test_straight_through_flip_counts_sign_changes_with_a_smooth_gradient():
    """The share of windows whose occlusion flips a finding (``flip`` detector features):
    exactly the hard share forward, the gradient of the soft flip probability backward."""
    before = torch.tensor([[1.0], [-0.5]], dtype=torch.float64, requires_grad=True)  # [K, 1]
    after = torch.tensor([[2.0, -0.1, 0.3], [-1.0, 0.2, 0.0]], dtype=torch.float64, requires_grad=True)  # [K, R]
    share = straight_through_flip(before, after, temperature=0.5).mean(-1)
    assert torch.equal(share, torch.tensor([1 / 3, 1 / 3], dtype=torch.float64))
    gb, ga = torch.autograd.grad(share.sum(), (before, after))
    b, a = before.detach().clone().requires_grad_(True), after.detach().clone().requires_grad_(True)
    sb, sa = torch.sigmoid(b / 0.5), torch.sigmoid(a / 0.5)
    eb, ea = torch.autograd.grad((sa * (1 - sb) + (1 - sa) * sb).mean(-1).sum(), (b, a))
    torch.testing.assert_close(gb, eb, rtol=0, atol=1e-15)
    torch.testing.assert_close(ga, ea, rtol=0, atol=1e-15)


def test_straight_through_argmax_selects_exactly_with_a_softmax_gradient():
    scores = torch.tensor([[0.5, 2.0, 1.0], [3.0, -1.0, 3.0]], dtype=torch.float64, requires_grad=True)
    upstream = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.7, -1.1]], dtype=torch.float64)
    out = straight_through_argmax(scores, dim=1, temperature=2.0)
    assert torch.equal(out, torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64))
    (grad,) = torch.autograd.grad((out * upstream).sum(), scores)
    probe = scores.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad((torch.softmax(probe / 2.0, dim=1) * upstream).sum(), probe)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-15)


def test_straight_through_topk_masks_the_k_largest():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7]], dtype=torch.float64, requires_grad=True)
    out = straight_through_topk(scores, 2, dim=1, temperature=0.1)
    assert torch.equal(out, torch.tensor([[0.0, 1.0, 0.0, 1.0]], dtype=torch.float64))
    (grad,) = torch.autograd.grad(out.sum(), scores)
    s = torch.sigmoid((scores.detach() - 0.6) / 0.1)  # tau halfway between 0.7 and 0.5
    torch.testing.assert_close(grad, s * (1 - s) / 0.1, rtol=0, atol=1e-12)
    full = straight_through_topk(scores, 4, dim=1)
    assert torch.equal(full, torch.ones(1, 4, dtype=torch.float64))
    assert torch.equal(torch.autograd.grad(full.sum(), scores)[0], torch.zeros(1, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="k must be"):
        straight_through_topk(scores, 5, dim=1)


def test_logistic_logit_is_the_fitted_pipelines_decision_function():
    from causal_ie.attacks.detection import fit_detector

    rng = np.random.default_rng(0)
    clean = rng.normal(size=(40, 3))
    adv = clean + rng.normal(0.8, 1.0, size=(40, 3))
    adv[0, 1] = np.nan  # non-finite features count as 0, in sklearn and in torch
    pipeline = fit_detector(clean, adv, np.ones(40, dtype=bool))
    logit = logistic_logit(pipeline)
    features = torch.tensor(np.concatenate([clean, adv]), requires_grad=True)
    torch.testing.assert_close(
        logit(features), torch.tensor(pipeline.decision_function(np.concatenate([clean, adv]))), rtol=0, atol=1e-12
    )
    (grad,) = torch.autograd.grad(logit(features).sum(), features)
    coef = pipeline.named_steps["clf"].coef_[0] / pipeline.named_steps["scale"].scale_
    torch.testing.assert_close(grad[2], torch.tensor(coef))
    assert grad[40, 1] == 0  # the NaN feature
    with pytest.raises(ValueError, match="last step"):
        logistic_logit(pipeline.named_steps["scale"])


class LinearNet(torch.nn.Module):
    """Finding 0's logit is w . x + b (finding 1 constant): gradients known in closed form."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w, self.b = torch.nn.Parameter(w), b

    def forward(self, x):
        z = (x.flatten(1) * self.w).sum(1) + self.b
        return torch.stack([z, torch.zeros_like(z)], dim=1)


@pytest.mark.parametrize("flipped", [False, True])
def test_orthogonal_steps_leave_the_other_goal_unchanged_to_first_order(flipped):
    """Bryniarski et al.'s orthogonal PGD, on a linear classifier and a linear detector whose
    gradients overlap (cosine 0.6): before the flip an L2 step raises the classification loss
    and leaves the detector's logit where it was; after it, lowers the detector's logit and
    leaves the classifier's."""
    g = torch.Generator().manual_seed(0)
    w_c = torch.zeros(16)
    w_c[:8] = 1.0
    w_d = torch.zeros(16)
    w_d[:8], w_d[8:] = 0.75, 1.0  # cosine(w_c, w_d) = 6 / (sqrt(8) * sqrt(12.5)) = 0.6
    model = LinearNet(w_c, b=-6.0 if not flipped else -2.0).eval()
    x = 0.4 + 0.2 * torch.rand(3, 1, 4, 4, generator=g)  # w_c . x = 3.2..4.8: z about -2 or +2

    def detector(images):
        return (images.flatten(1) * w_d).sum(1) - 5.0

    labels = torch.zeros(3, 2)  # untargeted: away from absent, so flipped means z > 0
    with torch.no_grad():
        z0, d0 = model(x)[:, 0], detector(x)
    assert bool(((z0 > 0) == flipped).all())
    out = AdaptivePGD(detector, eps=3.0, steps=1, alpha=0.05, norm="L2", random_start=False, orthogonal=True,
                      keep_best=False, seed=0)(model, x, labels, 0)
    with torch.no_grad():
        z1, d1 = model(out.images)[:, 0], detector(out.images)
    if flipped:  # the detector's logit falls by alpha * |w_d without w_c|; the classifier's stays
        torch.testing.assert_close(z1, z0, atol=1e-5, rtol=0)
        assert bool((d1 < d0 - 0.03).all())
    else:
        torch.testing.assert_close(d1, d0, atol=1e-5, rtol=0)
        assert bool((z1 > z0 + 0.03).all())


def test_orthogonal_steps_evade_the_toy_detector():
    model = CornerCenterNet().eval()
    images, labels = toy_images()
    plain = AdaptivePGD(corner_detector, eps=0.1, steps=10, weight=0, seed=0)(model, images, labels, 0)
    orthogonal = AdaptivePGD(corner_detector, eps=0.1, steps=10, weight=0, orthogonal=True, seed=0)(
        model, images, labels, 0)
    assert orthogonal.success.float().mean() >= 0.8
    assert orthogonal.detector_logit.mean() < plain.detector_logit.mean() - 3
