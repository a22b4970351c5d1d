"""Incremental inference (causal_ie.interventions.incremental) equals plain forwards.

Every check compares against ``model(perturbed)`` under ``torch.no_grad()`` in eval mode. timm
zero-initialises the last BatchNorm of residual branches, which would hide errors in those
branches, so every BatchNorm gets random statistics and affine parameters first.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from causal_ie.interventions import causal_effect
from causal_ie.interventions.engine import region_effects
from causal_ie.interventions.incremental import (
    IncrementalForward,
    changed_boxes,
    incremental_forward,
    incremental_support,
    mask_boxes,
    window_boxes,
)
from causal_ie.interventions.incremental.forward import _overlay, _Patch, _region_copy
from causal_ie.interventions.spec import InterventionSpec
from causal_ie.interventions.windows import WindowGrid
from causal_ie.models.random_weights import randomise_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5




def timm_model(name: str, in_chans: int = 1) -> nn.Module:
    import timm

    torch.manual_seed(0)
    return randomise_batchnorm(timm.create_model(name, num_classes=14, in_chans=in_chans))


def images(n: int, size: int = 32, channels: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def occluded(clean: torch.Tensor, image_idx: torch.Tensor, boxes: torch.Tensor, value: float = 0.0) -> torch.Tensor:
    x = clean[image_idx].clone()
    for b, (r0, r1, c0, c1) in enumerate(boxes.tolist()):
        x[b, :, r0:r1, c0:c1] = value
    return x


def grid_items(clean: torch.Tensor, window: int, stride: int, limit: int | None = None, seed: int = 0):
    """(image_idx, boxes, perturbed) of all windows of all images, shuffled (images mixed)."""
    grid = WindowGrid.create(tuple(clean.shape[-2:]), window, stride)
    n = clean.shape[0]
    image_idx = torch.arange(n).repeat_interleave(len(grid))
    window_idx = torch.arange(len(grid)).repeat(n)
    order = torch.randperm(image_idx.numel(), generator=torch.Generator().manual_seed(seed))
    if limit is not None:
        order = order[:limit]
    image_idx, window_idx = image_idx[order], window_idx[order]
    boxes = window_boxes(grid, window_idx)
    return image_idx, boxes, occluded(clean, image_idx, boxes)


def assert_plain_forwards(fwd: IncrementalForward, model: nn.Module, clean: torch.Tensor, window: int) -> None:
    """A refused model's forward is the plain forward, bit for bit, on every window of ``clean``."""
    image_idx, boxes, x = grid_items(clean, window, window)
    with torch.no_grad():
        assert torch.equal(fwd(x, image_idx, boxes), model(x))


def max_diff(model: nn.Module, fwd: IncrementalForward, x, image_idx, boxes, batch: int = 32) -> float:
    """Largest |logit difference| from the plain forward; the incremental path must have run."""
    worst = 0.0
    box = (int((boxes[:, 1] - boxes[:, 0]).max()), int((boxes[:, 3] - boxes[:, 2]).max()))
    assert fwd.supported and not fwd.describe(box)["plain"]
    with torch.no_grad():
        for s in range(0, x.shape[0], batch):
            plain = model(x[s:s + batch])
            ours = fwd(x[s:s + batch], image_idx[s:s + batch], boxes[s:s + batch])
            assert ours.shape == plain.shape
            worst = max(worst, float((plain - ours).abs().max()))
    return worst


# ---------------------------------------------------------------- exactness per model


@pytest.mark.parametrize("window,stride", [(5, 3), (5, 4), (8, 4)])
def test_classifier_all_windows(window, stride):
    """The project's Classifier (Normalize + timm test_resnet): every window of every image,
    uneven tilings with clipped last windows (5/4 on 32 px) and windows at all borders."""
    from causal_ie.models import Classifier

    torch.manual_seed(0)
    model = randomise_batchnorm(Classifier(backbone="test_resnet", image_size=32))
    clean = images(3)
    fwd = IncrementalForward(model, clean, verify=0)
    assert fwd.supported, fwd.reason
    image_idx, boxes, x = grid_items(clean, window, stride)
    if (window, stride) == (5, 4):
        assert int((boxes[:, 1] - boxes[:, 0]).min()) < window  # clipped windows are in the test
    assert max_diff(model, fwd, x, image_idx, boxes) <= TOL
    assert not fwd.describe((window, window))["plain"]


@pytest.mark.parametrize("cut", ["auto", 0.2, 1.0])
@pytest.mark.parametrize("name", ["test_resnet", "resnet18"])
def test_timm_resnets(name, cut):
    """Early, automatic and no cut (1.0: every map up to the global pool runs incrementally)."""
    model = timm_model(name)
    clean = images(2, size=48)
    fwd = IncrementalForward(model, clean, cut_fraction=cut, verify=0)
    assert fwd.supported, fwd.reason
    image_idx, boxes, x = grid_items(clean, 7, 5, limit=40)
    assert max_diff(model, fwd, x, image_idx, boxes) <= TOL


@pytest.mark.parametrize("cut", ["auto", 1.0])
def test_densenet121(cut):
    """DenseNet: channel concatenation of branches with different boxes, BatchNormAct2d leaves,
    average-pool transitions."""
    model = timm_model("densenet121")
    clean = images(2, size=64)
    fwd = IncrementalForward(model, clean, cut_fraction=cut, verify=0)
    assert fwd.supported, fwd.reason
    image_idx, boxes, x = grid_items(clean, 8, 4, limit=24)
    assert max_diff(model, fwd, x, image_idx, boxes) <= TOL


def test_efficientnet_falls_back_with_reason(caplog):
    """Squeeze-excitation in the first block mixes the whole map: plain forwards, and the log says where."""
    model = timm_model("efficientnet_b0")
    clean = images(2, size=32)
    with caplog.at_level(logging.INFO, logger="causal_ie.interventions.incremental"):
        fwd = IncrementalForward(model, clean, verify=0)
    assert not fwd.supported
    assert "blocks.0.0.se" in fwd.reason and "mean" in fwd.reason
    assert any("blocks.0.0.se" in r.getMessage() for r in caplog.records)
    assert_plain_forwards(fwd, model, clean, 8)


def test_channels_last():
    model = timm_model("test_resnet").to(memory_format=torch.channels_last)
    clean = images(2).contiguous(memory_format=torch.channels_last)
    fwd = IncrementalForward(model, clean, verify=0)
    assert fwd.memory_format == torch.channels_last
    image_idx, boxes, x = grid_items(clean, 6, 4, limit=30)
    assert max_diff(model, fwd, x.contiguous(memory_format=torch.channels_last), image_idx, boxes) <= TOL


def test_three_channel_input_and_constant_baseline():
    model = timm_model("test_resnet", in_chans=3)
    clean = images(2, channels=3)
    fwd = IncrementalForward(model, clean, verify=0)
    image_idx, boxes, _ = grid_items(clean, 6, 5, limit=20)
    x = occluded(clean, image_idx, boxes, value=0.7)
    assert max_diff(model, fwd, x, image_idx, boxes) <= TOL


# ---------------------------------------------------------------- batching


def test_batch_size_invariance_and_mixed_images():
    model = timm_model("test_resnet")
    clean = images(3)
    fwd = IncrementalForward(model, clean, verify=0)
    image_idx, boxes, x = grid_items(clean, 6, 4, limit=24, seed=3)
    assert len(set(image_idx[:8].tolist())) > 1  # batches mix images
    with torch.no_grad():
        whole = fwd(x, image_idx, boxes)
        for size in (1, 5):
            parts = torch.cat([fwd(x[s:s + size], image_idx[s:s + size], boxes[s:s + size])
                               for s in range(0, x.shape[0], size)])
            assert (parts - whole).abs().max() <= 1e-6


def test_boxes_inferred_from_pixels_and_pixel_granularity():
    """Without boxes they are the changed pixels' bounding box; single pixels and odd shapes work."""
    model = timm_model("test_resnet")
    clean = images(2)
    fwd = IncrementalForward(model, clean, verify=0)
    image_idx = torch.tensor([0, 1, 0, 1, 0])
    boxes = torch.tensor([[0, 1, 0, 1], [31, 32, 31, 32], [10, 11, 20, 21], [3, 20, 30, 32], [0, 32, 5, 6]])
    x = occluded(clean, image_idx, boxes, value=0.5)
    assert torch.equal(changed_boxes(x, clean[image_idx]), boxes)
    with torch.no_grad():
        plain = model(x)
        assert (fwd(x, image_idx) - plain).abs().max() <= TOL
        assert (fwd(x, image_idx, boxes) - plain).abs().max() <= TOL


def test_unchanged_items_give_clean_logits_exactly():
    """Empty boxes (the engine's unperturbed inputs) and windows already equal to the baseline cost
    nothing and give the clean logits bit for bit (effect exactly 0)."""
    model = timm_model("test_resnet")
    clean = images(2)
    clean[1, :, :8, :8] = 0.0  # a black corner: the zero baseline changes nothing there
    fwd = IncrementalForward(model, clean, verify=0)
    image_idx = torch.tensor([0, 1, 1])
    boxes = torch.tensor([[0, 0, 0, 0], [0, 8, 0, 8], [8, 16, 8, 16]])
    x = occluded(clean, image_idx, boxes)
    with torch.no_grad():
        out = fwd(x, image_idx, boxes)
        assert torch.equal(out[0], fwd.clean_logits[0])
        assert torch.equal(out[1], fwd.clean_logits[1])
        assert (out[2] - model(x[2:])).abs().max() <= TOL
        assert (fwd.clean_logits - model(clean)).abs().max() <= 1e-6


def test_ce_maps_equal_engine_and_captum():
    """Plugged into the engine as its forward, the maps equal the plain engine's (which equals
    Captum's Occlusion) within 1e-5."""
    from captum.attr import Occlusion

    from causal_ie.models import Classifier

    torch.manual_seed(0)
    model = randomise_batchnorm(Classifier(backbone="test_resnet", image_size=32))
    clean = images(2)
    grid = WindowGrid.create((32, 32), 5, 4)
    spec = InterventionSpec(batch_size=16)
    with torch.no_grad():
        forward = incremental_forward(model, clean, verify=0)
        effects = region_effects(forward, clean, grid, spec.baseline_for(clean), spec)
    ours = grid.assemble(effects)
    expected = causal_effect(model, clean, window=5, stride=4, spec=spec)
    assert (ours - expected).abs().max() <= TOL
    with torch.no_grad():
        captum = Occlusion(lambda z: model(z).sigmoid()[:, 3]).attribute(
            clean, sliding_window_shapes=(1, 5, 5), strides=(1, 4, 4), baselines=0.0, perturbations_per_eval=32
        )
    assert (ours[:, 3:4] - captum).abs().max() <= TOL


def test_irregular_masks_through_the_engine():
    """Superpixel-like regions (discs of different sizes, per image) through the engine's
    MaskRegions and a noise baseline: boxes come from the changed pixels."""
    from causal_ie.interventions.engine import MaskRegions

    model = timm_model("test_resnet")
    clean = images(2)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    centres = [(4, 4, 3), (16, 20, 6), (30, 2, 4), (10, 28, 2), (20, 10, 9)]
    masks = torch.stack([(yy - y) ** 2 + (xx - x) ** 2 <= r * r for y, x, r in centres])
    masks = torch.stack([masks, masks.flip(-1)])  # other regions for the second image
    regions = MaskRegions(masks, 2)
    spec = InterventionSpec(baseline="noise", noise_samples=2, seed=0, batch_size=7, outcome="logit")
    with torch.no_grad():
        forward = incremental_forward(model, clean, verify=0)
        ours = region_effects(forward, clean, regions, spec.baseline_for(clean), spec)
        plain = region_effects(lambda batch, idx: model(batch), clean, regions, spec.baseline_for(clean), spec)
    assert (ours - plain).abs().max() <= TOL


# ---------------------------------------------------------------- rules and fallbacks


class _InplaceNet(nn.Module):
    """In-place ReLU and functional in-place ops, a max pool with ceil_mode, a dilated conv, a
    'same'-padded conv, a strided 1x1 shortcut, mul of two branches."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.dil = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.same = nn.Conv2d(8, 8, 4, padding="same")
        self.short = nn.Conv2d(8, 8, 1, stride=2)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.gate = nn.Conv2d(8, 8, 1)
        self.avg = nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.act(self.bn(self.stem(x)))
        x = self.pool(x)
        y = F.relu(self.dil(x), inplace=True)
        y = self.same(y).relu_()
        z = self.down(y) + self.short(x)
        z = z * torch.sigmoid(self.gate(z))
        z = self.avg(z)
        return self.head(z.mean((2, 3)))


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_hand_built_rules_and_inplace_ops():
    torch.manual_seed(0)
    model = randomise_batchnorm(_InplaceNet())
    clean = images(3, size=30)  # odd maps on the way: ceil_mode pooling reaches past the border
    fwd = IncrementalForward(model, clean, cut_fraction=1.0, verify=0)
    assert fwd.supported, fwd.reason
    for window, stride in [(4, 3), (7, 5), (1, 1)]:
        image_idx, boxes, x = grid_items(clean, window, stride, limit=60)
        assert max_diff(model, fwd, x, image_idx, boxes) <= TOL, (window, stride)


class _EarlyMixing(nn.Module):
    """Subtracts the spatial mean right after the stem: every pixel changes every output."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.body = nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1) for _ in range(4)])
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        x = x - x.mean(dim=(2, 3), keepdim=True)
        return self.head(self.body(x).amax(dim=(2, 3)))


def test_global_mixing_falls_back_naming_the_op(caplog):
    model = _EarlyMixing().eval()
    clean = images(2, size=16)
    with caplog.at_level(logging.INFO, logger="causal_ie.interventions.incremental"):
        fwd = IncrementalForward(model, clean, verify=0)
    assert not fwd.supported
    assert "mean" in fwd.reason and "global mixing" in fwd.reason
    assert sum("mean" in r.getMessage() for r in caplog.records) == 1
    assert incremental_support(model, (1, 16, 16)) == (False, fwd.reason)
    assert_plain_forwards(fwd, model, clean, 4)


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            x = self.conv(x)
        return self.head(x.mean((2, 3)).expand(-1, 4))


def test_untraceable_model_falls_back():
    model = _Untraceable().eval()
    clean = images(2, size=8)
    fwd = IncrementalForward(model, clean, verify=0)
    assert not fwd.supported and "torch.fx cannot trace" in fwd.reason
    assert_plain_forwards(fwd, model, clean, 4)


class _StaleInplace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y = self.conv(x)
        z = self.conv2(y.clone())
        y.add_(1.0)  # changes y in place ...
        return self.head((y + z).mean((2, 3)))  # ... and reads it again


def test_inplace_change_read_later_falls_back():
    model = _StaleInplace().eval()
    clean = images(2, size=16)
    fwd = IncrementalForward(model, clean, verify=0)
    assert not fwd.supported and "in place" in fwd.reason
    assert_plain_forwards(fwd, model, clean, 4)


def test_supported_models_and_training_mode():
    model = timm_model("test_resnet")
    assert incremental_support(model, (1, 32, 32)) == (True, "")
    x = occluded(images(1), torch.tensor([0]), torch.tensor([[0, 4, 0, 4]]))
    model.train()  # set up in training mode: the clean pass still runs in eval mode
    fwd = IncrementalForward(model, images(1), verify=0)
    assert model.training
    with pytest.raises(ValueError, match="eval mode"):
        fwd(x, torch.tensor([0]), torch.tensor([[0, 4, 0, 4]]))
    model.eval()
    with torch.no_grad():
        assert (fwd(x, torch.tensor([0]), torch.tensor([[0, 4, 0, 4]])) - model(x)).abs().max() <= TOL
        assert (fwd.clean_logits - model(images(1))).abs().max() <= 1e-6


def test_plan_reports_the_cut():
    model = timm_model("test_resnet")
    fwd = IncrementalForward(model, images(1, size=64), cut_fraction=0.3)
    info = fwd.describe((8, 8))
    assert info["supported"] and not info["plain"] and "patch over 30%" in info["cut"]
    assert info["estimated_gain"] > 1
    whole = IncrementalForward(model, images(1, size=64), cut_fraction=1.0).describe((8, 8))
    assert "global_pool" in whole["cut"]


# ---------------------------------------------------------------- helpers


def test_box_helpers():
    grid = WindowGrid.create((10, 9), (4, 3), (3, 4))
    boxes = window_boxes(grid, torch.arange(len(grid)))
    masks = torch.zeros(len(grid), 10, 9, dtype=torch.bool)
    for r, (r0, r1, c0, c1) in enumerate(boxes.tolist()):
        masks[r, r0:r1, c0:c1] = True
    flat = grid.pixel_index(torch.arange(len(grid)))
    assert torch.equal(masks.view(len(grid), -1).float().sum(1), torch.tensor(
        [float(len(set(row))) for row in flat.tolist()]))
    assert torch.equal(mask_boxes(masks), boxes)
    assert torch.equal(mask_boxes(torch.zeros(2, 5, 5, dtype=torch.bool)), torch.zeros(2, 4, dtype=torch.long))


def test_fused_gather_equals_per_item_copies():
    src = torch.randn(3, 4, 12, 11)
    index, rows, cols = [2, 0, 2, 1], [0, 5, 3, 7], [6, 0, 2, 4]
    a, b = torch.empty(4, 4, 5, 4), torch.empty(4, 4, 5, 4)
    _region_copy(a, src, index, rows, cols, fused=False)
    _region_copy(b, src, index, rows, cols, fused=True)
    assert torch.equal(a, b)
    # overlays: uniform offsets (one copy) and clipped per-item offsets
    patch = _Patch(torch.randn(4, 4, 3, 3), [1, 6, 4, 8], [7, 1, 3, 6])
    a.zero_()
    _overlay(a, patch, rows, cols)
    for k in range(4):
        dy, dx = patch.r0[k] - rows[k], patch.c0[k] - cols[k]
        expect = torch.zeros(4, 5, 4)
        region = expect[:, max(dy, 0):dy + 3, max(dx, 0):dx + 3]
        region.copy_(patch.data[k][:, max(-dy, 0):max(-dy, 0) + region.shape[1], max(-dx, 0):max(-dx, 0) + region.shape[2]])
        assert torch.equal(a[k], expect)


def test_verify_catches_a_wrong_result(caplog):
    """The first batch of a plan is checked against the plain forward: a wrong cache is caught,
    logged, and plain forwards take over."""
    model = timm_model("test_resnet")
    clean = images(2)
    fwd = IncrementalForward(model, clean, verify=2)
    image_idx, boxes, x = grid_items(clean, 6, 4, limit=8)
    with torch.no_grad():
        assert (fwd(x, image_idx, boxes) - model(x)).abs().max() <= TOL
        plan = next(iter(fwd._plans.values()))
        assert plan.checked and not plan.plain
        plan.checked = False
        for cache in fwd._caches.values():
            cache.add_(0.5)  # stale clean activations
        with caplog.at_level(logging.WARNING, logger="causal_ie.interventions.incremental"):
            out = fwd(x, image_idx, boxes)
    assert plan.plain and any("differs from the plain forward" in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        assert torch.equal(out, model(x))


def test_cache_limit_cuts_earlier_and_stays_exact():
    model = timm_model("resnet18")
    clean = images(2, size=64)
    free = IncrementalForward(model, clean, cut_fraction="auto", cache_limit=None, verify=0)
    roomy = free.describe((8, 8))["cache_bytes_per_image"]
    tight = IncrementalForward(model, clean, cut_fraction="auto", cache_limit=roomy, verify=0)  # for 2 images
    info = tight.describe((8, 8))
    assert info["cache_bytes_per_image"] * 2 <= roomy and info["incremental_nodes"] < free.describe((8, 8))[
        "incremental_nodes"]
    image_idx, boxes, x = grid_items(clean, 8, 6, limit=20)
    assert max_diff(model, tight, x, image_idx, boxes) <= TOL
    assert tight.cache_bytes <= roomy


# ---------------------------------------------------------------- issue #15 done-when: Captum equality per model


@pytest.mark.parametrize("backbone", ["resnet18", "densenet121", "efficientnet_b0"])
def test_default_engine_equals_captum_at_uneven_tilings(backbone):
    """The default engine (incremental, channels_last, inference mode) against Captum Occlusion on the
    project's Classifier: an uneven tiling (9/6 on 64 px: clipped last windows), within 1e-5.
    efficientnet_b0 is refused by the incremental engine (squeeze-excitation) and runs plain forwards."""
    from captum.attr import Occlusion

    from causal_ie.interventions.incremental import incremental_support
    from causal_ie.models import Classifier

    torch.manual_seed(0)
    model = randomise_batchnorm(Classifier(backbone=backbone, image_size=64))
    assert incremental_support(model, (1, 64, 64))[0] is (backbone != "efficientnet_b0")
    x = images(1, size=64)
    ours = causal_effect(model, x, window=9, stride=6, outcome="logit", batch_size=32)
    for k in (0, 9):
        with torch.no_grad():
            captum = Occlusion(lambda z, k=k: model(z)[:, k]).attribute(
                x, sliding_window_shapes=(1, 9, 9), strides=(1, 6, 6), baselines=0.0, perturbations_per_eval=32
            )
        assert (ours[:, k:k + 1] - captum).abs().max() <= TOL
    assert ours.abs().max() > 1e-4  # not trivially zero (efficientnet_b0 at random: ~3e-4)


def test_suffix_compiler_and_plain_forward_hooks():
    """The network after the cut handed over as one fx module (here run as it is) gives the same logits;
    a refused model runs ``plain_forward``."""
    import torch.fx as fx

    model = timm_model("resnet18")
    clean = images(2, size=48)
    handed = []

    def suffix_compiler(module, batched):
        assert isinstance(module, fx.GraphModule) and any(batched)
        handed.append(batched)
        return module

    fwd = IncrementalForward(model, clean, verify=0, suffix_compiler=suffix_compiler)
    image_idx, boxes, x = grid_items(clean, 7, 5, limit=24)
    assert max_diff(model, fwd, x, image_idx, boxes) <= TOL
    assert len(handed) >= 1
    plan = fwd._plan((7, 7))
    assert plan.suffix is not None and plan.suffix_inputs

    seen = []
    efficient = timm_model("efficientnet_b0")
    clean = images(2, size=32)
    fwd = IncrementalForward(efficient, clean, verify=0, plain_forward=lambda z: seen.append(z.shape[0]) or efficient(z))
    image_idx, boxes, x = grid_items(clean, 8, 8)
    with torch.no_grad():
        assert torch.equal(fwd(x, image_idx, boxes), efficient(x))
    assert seen == [x.shape[0]]
