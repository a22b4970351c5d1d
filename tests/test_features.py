"""The CE detector's features: hand-computed values on tiny effects, and the extractor on a
linear model whose effects are known in closed form."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from causal_ie.attacks.features import CEFeatureExtractor, agreement, region_features
from causal_ie.data import FINDINGS

pytestmark = pytest.mark.usefixtures("one_thread")


def test_region_features_by_hand():
    # one image, 3 findings, 4 regions; effects E = z - z(do(region))
    logits = torch.tensor([[2.0, -0.5, 0.1]])
    effects = torch.tensor([[[1.0, 3.0, -1.0, 0.0], [0.0, -1.0, 0.0, 0.0], [0.2, 0.0, 0.0, -0.3]]])
    f = region_features(effects, logits, "v.", nearest=2)
    assert f["v.0.max"].item() == 3.0 and f["v.0.min"].item() == -1.0
    assert f["v.0.l1"].item() == pytest.approx(5.0 / 4)
    # finding 0: z' = 1, -1, 3, 2 -> one flip; finding 1: z' = -0.5, 0.5, -0.5, -0.5 -> one flip;
    # finding 2: z' = -0.1, 0.1, 0.1, 0.4 -> one flip
    assert [f[f"v.{k}.flip"].item() for k in range(3)] == [0.25, 0.25, 0.25]
    # nearest the threshold: finding 2 (|z| = 0.1), then finding 1 (0.5)
    assert f["v.nearest0.abs_logit"].item() == pytest.approx(0.1)
    assert f["v.nearest0.max"].item() == pytest.approx(0.2) and f["v.nearest0.min"].item() == pytest.approx(-0.3)
    assert f["v.nearest1.abs_logit"].item() == 0.5 and f["v.nearest1.min"].item() == -1.0
    assert f["v.max.max"].item() == 3.0 and f["v.min.min"].item() == -1.0
    assert f["v.flip.mean"].item() == pytest.approx(0.25) and f["v.flip.max"].item() == 0.25
    # spatial entropy of the summed |E| per region: 1.2, 4.0, 1.0, 0.3
    mass = torch.tensor([1.2, 4.0, 1.0, 0.3])
    p = mass / mass.sum()
    assert f["v.spatial_entropy"].item() == pytest.approx(float(-(p * p.log()).sum() / math.log(4)), rel=1e-6)


def test_findings_the_model_does_not_predict_are_left_out():
    logits = torch.tensor([[0.2, float("nan"), -3.0]])
    effects = torch.tensor([[[0.5, 0.0], [float("nan"), float("nan")], [1.0, 1.0]]])
    f = region_features(effects, logits, "", nearest=3)
    assert f["nearest0.abs_logit"].item() == pytest.approx(0.2)
    assert f["nearest1.abs_logit"].item() == 3.0
    assert math.isinf(f["nearest2.abs_logit"].item())  # the NaN finding comes last
    assert f["l1.mean"].item() == pytest.approx((0.25 + 1.0) / 2)
    assert f["flip.mean"].item() == pytest.approx(0.5 / 2)  # finding 0 flips in one of 2 regions


def test_agreement_of_identical_and_opposite_views():
    pixel = torch.randn(2, 3, 16)
    logits = torch.zeros(2, 3)
    assert torch.allclose(agreement(pixel, 2 * pixel + 1, logits), torch.ones(2))
    assert torch.allclose(agreement(pixel, -pixel, logits), -torch.ones(2))


class Linear(nn.Module):
    """logit_k = sum of the image weighted by w_k: the effect of zeroing a region is the sum of
    w_k * x over it, known in closed form."""

    def __init__(self, size: int = 8, k: int = 14):
        super().__init__()
        self.findings = FINDINGS[:k]  # the output names the features are keyed by
        self.weight = nn.Parameter(torch.randn(k, size * size, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return x.flatten(1) @ self.weight.T


def test_extractor_features_are_the_closed_form_effects_of_a_linear_model():
    model = Linear()
    x = torch.rand(2, 1, 8, 8)
    extractor = CEFeatureExtractor(grids=(2,), baselines=("zero",), latent_layer=None, nearest=1)
    f = extractor(model, x)
    # 2x2 windows of 4x4 pixels; effect of zeroing window r on finding k = sum_{pixels in r} w_k x
    w = model.weight.detach().view(14, 8, 8)
    contrib = (w[None] * x).view(2, 14, 2, 4, 2, 4).sum((3, 5)).flatten(2)  # [N, K, 4]
    torch.testing.assert_close(f["g2_zero.Atelectasis.max"], contrib[:, 0].amax(-1))
    torch.testing.assert_close(f["g2_zero.Hernia.min"], contrib[:, 13].amin(-1))
    torch.testing.assert_close(f["g2_zero.l1.mean"], contrib.abs().mean(-1).mean(-1))
    # differentiable: the features carry gradients back to the image
    xg = x.clone().requires_grad_(True)
    extractor(model, xg, differentiable=True)["g2_zero.Atelectasis.max"].sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_extractor_settings_are_checked():
    with pytest.raises(ValueError, match="grids"):
        CEFeatureExtractor(grids=(0,))
    with pytest.raises(ValueError, match="baselines"):
        CEFeatureExtractor(baselines=())
