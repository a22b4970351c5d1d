"""CAM baselines: every method runs, finds the right layer, leaves the model as it was."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from torch.nn import functional as F

from causal_ie.explain.cam import CAM_METHODS, CAMExplainer, auto_target_layer, resolve_target_layer
from causal_ie.models import Classifier

# layer3 of test_resnet is 2x2 at 32 px (layer4 would be 1x1: a flat map)
LAYER = "backbone.layer3"


@pytest.fixture(scope="module")
def model() -> Classifier:
    torch.manual_seed(0)
    return Classifier(backbone="test_resnet", image_size=32).eval()


def pairs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two images; three pairs, two of them on image 0 with different findings."""
    images = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    return images, torch.tensor([0, 0, 1]), torch.tensor([0, 3, 5])


def hook_count(module: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in module.modules()
    )


@pytest.mark.parametrize("method", list(CAM_METHODS))
def test_every_method_gives_unit_maps_at_input_size(model, method):
    images, img_idx, finding_idx = pairs()
    modules_before = dict(model.named_modules())
    maps = CAMExplainer(method, target_layer=LAYER)(model, images, img_idx, finding_idx)
    assert maps.shape == (3, 32, 32) and maps.dtype == torch.float32
    assert maps.device == images.device
    assert torch.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-6
    # Ablation-CAM swaps the layer out while it works: it must be back
    assert dict(model.named_modules()) == modules_before


def test_method_names():
    assert CAMExplainer("GradCAM").method == "gradcam"
    assert CAMExplainer("gradcampp").method == "gradcam++"
    explainer = CAMExplainer("gradcam++")
    assert explainer.kind == "cam" and explainer.method == "gradcam++"
    with pytest.raises(ValueError, match="valid names:.*eigencam"):
        CAMExplainer("gradcam3000")


@pytest.mark.parametrize(
    "backbone, expected",
    [
        ("test_resnet", "backbone.layer4.0"),
        ("resnet18", "backbone.layer4.1"),
        ("densenet121", "backbone.features.norm5"),
        ("efficientnet_b0", "backbone.bn2"),
    ],
)
def test_auto_target_layer(backbone, expected):
    holder = nn.Module()  # a Classifier-shaped model without the Lightning parts
    holder.backbone = timm.create_model(backbone, num_classes=14, in_chans=1)
    assert auto_target_layer(holder) == expected
    name, layer = resolve_target_layer(holder, "auto")
    assert name == expected and layer is holder.get_submodule(expected)


def test_target_layer_by_name(model):
    assert resolve_target_layer(model, "layer3")[1] is model.backbone.layer3
    assert resolve_target_layer(model, "backbone.layer3")[1] is model.backbone.layer3
    assert resolve_target_layer(model, "backbone.layer4.0")[1] is model.backbone.layer4[-1]
    with pytest.raises(ValueError, match="valid names include.*backbone.layer4"):
        resolve_target_layer(model, "layer99")


def test_works_under_no_grad_and_inference_mode(model):
    images, img_idx, finding_idx = pairs()
    explainer = CAMExplainer("gradcam", target_layer=LAYER)
    plain = explainer(model, images, img_idx, finding_idx)
    with torch.no_grad():
        no_grad = explainer(model, images, img_idx, finding_idx)
    with torch.inference_mode():
        inference_images = images.clone()  # an inference tensor, as in Lightning's test loop
        inference = explainer(model, inference_images, img_idx, finding_idx)
    torch.testing.assert_close(no_grad, plain)
    torch.testing.assert_close(inference.clone(), plain)


@pytest.mark.parametrize("method", ["gradcam", "fullgrad"])
def test_hooks_are_released(model, method):
    images, img_idx, finding_idx = pairs()
    layer = model.backbone.layer3
    before = (len(layer._forward_hooks), len(layer._backward_hooks), hook_count(model))
    CAMExplainer(method, target_layer=LAYER)(model, images, img_idx, finding_idx)
    assert (len(layer._forward_hooks), len(layer._backward_hooks), hook_count(model)) == before


def test_model_modes_flags_and_grads_are_restored():
    model = Classifier(backbone="test_resnet", image_size=32).train()
    model.backbone.layer1.eval()  # a mixed state must survive too
    frozen = model.backbone.conv1[0].weight
    frozen.requires_grad_(False)
    marker = torch.full_like(model.backbone.fc.weight, 7.0)
    model.backbone.fc.weight.grad = marker
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    images, img_idx, finding_idx = pairs()
    CAMExplainer("gradcam", target_layer=LAYER)(model, images, img_idx, finding_idx)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert model.backbone.fc.weight.grad is marker
    assert all(p.grad is None for name, p in model.named_parameters() if name != "backbone.fc.weight")


def test_batches_of_pairs_give_the_same_maps(model):
    images, img_idx, finding_idx = pairs()
    one_pass = CAMExplainer("gradcam", target_layer=LAYER, batch_size=32)(model, images, img_idx, finding_idx)
    in_pairs = CAMExplainer("gradcam", target_layer=LAYER, batch_size=2)(model, images, img_idx, finding_idx)
    torch.testing.assert_close(in_pairs, one_pass)
    empty = CAMExplainer("gradcam")(model, images, img_idx[:0], finding_idx[:0])
    assert empty.shape == (0, 32, 32)


def test_non_square_images(model):
    images = torch.rand(1, 1, 32, 48)
    maps = CAMExplainer("gradcam", target_layer=LAYER)(model, images, torch.tensor([0]), torch.tensor([2]))
    assert maps.shape == (1, 32, 48)


class RegionFeatures(nn.Module):
    """Channel k is ``1 + |image|`` (pooled to 8x8) inside region k and 0 outside it."""

    def __init__(self, regions: list[tuple[int, int, int, int]], grid: int = 8):
        super().__init__()
        masks = torch.zeros(len(regions), grid, grid)
        for k, (r0, r1, c0, c1) in enumerate(regions):
            masks[k, r0:r1, c0:c1] = 1.0
        self.register_buffer("masks", masks)
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(x, self.grid)
        return self.masks * (1 + pooled.abs())


class RegionBackbone(nn.Module):
    """Logit of finding k = sum of feature channel k, i.e. of the image inside region k only."""

    def __init__(self, regions: list[tuple[int, int, int, int]], num_findings: int = 14):
        super().__init__()
        self.features = RegionFeatures(regions)
        self.scale = nn.Parameter(torch.ones(()))  # grad-cam needs the model to have a parameter
        self.num_findings = num_findings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.scale * self.features(x).sum(dim=(2, 3))
        return F.pad(logits, (0, self.num_findings - logits.shape[1]))


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "hirescam", "layercam"])
def test_cam_is_highest_where_the_finding_is_decided(method):
    # finding 0 lives in grid rows 1-2, cols 1-2 (pixels 4-11, 4-11);
    # finding 1 in grid rows 5-6, cols 4-6 (pixels 20-27, 16-27)
    model = Classifier(backbone="test_resnet", image_size=32).eval()
    model.backbone = RegionBackbone([(1, 3, 1, 3), (5, 7, 4, 7)])
    images = torch.rand(1, 1, 32, 32)
    explainer = CAMExplainer(method, target_layer="features")
    maps = explainer(model, images, torch.tensor([0, 0]), torch.tensor([0, 1]))
    regions = [(slice(4, 12), slice(4, 12)), (slice(20, 28), slice(16, 28))]
    for k, (rows, cols) in enumerate(regions):
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[rows, cols] = True
        peak = int(maps[k].argmax())
        assert inside.flatten()[peak], f"finding {k}: peak at {divmod(peak, 32)}"
        assert maps[k][inside].mean() > 0.5 > maps[k][~inside].mean()
