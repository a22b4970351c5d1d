"""Latent CE: the fx split is exact, effects equal brute-force hooks, the prefix runs once per image."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from causal_ie.interventions import LatentSplit, auto_layer, latent_effect, latent_split
from causal_ie.models import Classifier

K = 14


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def classifier():
    """A tiny Classifier whose BatchNorms are not the identity (timm zero-inits the last
    BatchNorm of each residual branch, which would make the branch -- and every
    intervention inside it -- have no effect)."""
    torch.manual_seed(0)
    model = Classifier(backbone="test_resnet", image_size=32).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model


def images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "name,layer", [("test_resnet", "layer2"), ("resnet18", "layer2"), ("densenet121", "features.transition1")]
)
def test_split_is_exact_for_timm_backbones(name, layer):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=K, in_chans=1).eval()
    assert auto_layer(model) == layer
    split = LatentSplit(model, "auto")
    assert split.layer == layer
    x = images()
    with torch.no_grad():
        activation, carried = split.encode(x)
        assert activation.dim() == 4 and carried == ()
        torch.testing.assert_close(split(x), model(x), atol=1e-6, rtol=0)


def test_split_inside_a_block_carries_the_skip_connection():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=K, in_chans=1).eval()
    split = LatentSplit(model, "layer2.0.conv1")
    assert split.carried_names  # the shortcut starts before the cut
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(split(x), model(x), atol=1e-6, rtol=0)


def test_auto_layer_of_a_classifier_and_of_other_backbones(classifier):
    assert auto_layer(classifier) == "backbone.layer2"
    assert auto_layer(timm.create_model("test_efficientnet", num_classes=K, in_chans=1)) == "blocks.3"
    vit = timm.create_model("test_vit", num_classes=K, in_chans=1)
    modules = [entry["module"] for entry in vit.feature_info]
    assert auto_layer(vit) == modules[len(modules) // 2]  # no rule: the middle of feature_info
    assert latent_split(classifier, "layer2").layer == "backbone.layer2"  # relative to the backbone


def test_unknown_layer_lists_valid_names(classifier):
    with pytest.raises(ValueError, match=r"layer='layer9'.*backbone\.layer2"):
        latent_effect(classifier, images(), layer="layer9")
    with pytest.raises(ValueError, match="layer='auto'"):
        auto_layer(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()))
    with pytest.raises(ValueError, match="mode"):
        latent_effect(classifier, images(), mode="pixel")
    with pytest.raises(ValueError, match="baseline"):
        latent_effect(classifier, images(), baseline="blur")


def brute_force(model, module, x, edit, count):
    """CE_k of each of ``count`` edits of ``module``'s output, one forward per edit via a hook."""
    with torch.no_grad():
        p = model(x).sigmoid()
        effects = []
        for i in range(count):
            handle = module.register_forward_hook(lambda m, args, out, i=i: edit(out.clone(), i))
            try:
                effects.append(p - model(x).sigmoid())
            finally:
                handle.remove()
    return torch.stack(effects, dim=-1)  # [N, K, count]


@pytest.mark.parametrize("layer", ["backbone.layer2", "backbone.layer2.0.bn1"])  # the second carries the shortcut
@pytest.mark.parametrize("baseline", ["zero", "mean", 0.5])
def test_spatial_effect_equals_brute_force_hooks(classifier, layer, baseline):
    x = images()
    effects = latent_effect(classifier, x, layer=layer, mode="spatial", baseline=baseline, batch_size=7)
    n, k, h, w = effects.shape
    assert (n, k) == (2, K)
    module = classifier.get_submodule(layer)

    def edit(out, i):
        if baseline == "mean":
            out[:, :, i // w, i % w] = out.mean(dim=(2, 3))
        else:
            out[:, :, i // w, i % w] = 0.0 if baseline == "zero" else baseline
        return out

    expected = brute_force(classifier, module, x, edit, h * w).view(n, k, h, w)
    torch.testing.assert_close(effects, expected, atol=1e-6, rtol=0)
    assert effects.abs().amax() > 0
    assert bool(latent_split(classifier, layer).carried_names) == layer.endswith("bn1")


@pytest.mark.parametrize("baseline", ["zero", "mean"])
def test_channel_effect_equals_brute_force_hooks(classifier, baseline):
    x = images()
    effects = latent_effect(classifier, x, layer="backbone.layer2", mode="channel", baseline=baseline, batch_size=16)
    module = classifier.get_submodule("backbone.layer2")

    def edit(out, c):
        out[:, c] = out[:, c].mean(dim=(-2, -1), keepdim=True) if baseline == "mean" else 0.0
        return out

    expected = brute_force(classifier, module, x, edit, effects.shape[-1])
    assert effects.shape == (2, K, 48)
    torch.testing.assert_close(effects, expected, atol=1e-6, rtol=0)


def test_prefix_runs_once_per_image(classifier):
    first = classifier.get_submodule("backbone.conv1.0")  # a leaf of the prefix
    head = classifier.get_submodule("backbone.fc")  # a leaf of the suffix
    seen = {"prefix": 0, "suffix": 0}
    hooks = [
        first.register_forward_hook(lambda m, a, o: seen.__setitem__("prefix", seen["prefix"] + a[0].shape[0])),
        head.register_forward_hook(lambda m, a, o: seen.__setitem__("suffix", seen["suffix"] + a[0].shape[0])),
    ]
    try:
        effects = latent_effect(classifier, images(3), layer="auto", batch_size=10)
    finally:
        for hook in hooks:
            hook.remove()
    cells = effects.shape[-2] * effects.shape[-1]
    assert seen == {"prefix": 3, "suffix": 3 + 3 * cells}


def test_latent_maps_upsample_spatial_and_weight_channel_effects(classifier):
    x = images()
    spatial = latent_effect(classifier, x)
    maps = latent_effect(classifier, x, as_maps=True)
    assert maps.shape == (2, K, 32, 32)
    torch.testing.assert_close(
        maps, nn.functional.interpolate(spatial, size=(32, 32), mode="bilinear", align_corners=False)
    )
    channel = latent_effect(classifier, x, mode="channel")
    activation, _ = latent_split(classifier).encode(x)
    weights = activation.abs()
    expected = (channel[..., None, None] * weights[:, None]).sum(2) / weights.sum(1, keepdim=True)
    expected = nn.functional.interpolate(expected, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(latent_effect(classifier, x, mode="channel", as_maps=True), expected, atol=1e-6, rtol=0)
    assert latent_effect(classifier, x, outcome="ece", as_maps=True).shape == (2, 1, 32, 32)
