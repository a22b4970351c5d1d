"""CE explainers: the pairs they return, the real Hydra mask configs, no_grad / inference_mode."""

from __future__ import annotations

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from torch import nn

from causal_ie.explain.explainers import Explainer, LatentCE, PatchCE, SuperpixelCE
from causal_ie.interventions import InterventionSpec, causal_effect
from causal_ie.models import Classifier
from conftest import compose_config

K = 14


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    model = Classifier(backbone="test_resnet", image_size=16).eval()
    with torch.no_grad():  # BatchNorms that are not the identity, so every layer matters
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
    return model


def images(n: int = 3, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(n))


PAIRS = (torch.tensor([2, 0, 2, 2]), torch.tensor([5, 1, 0, 13]))


@pytest.mark.parametrize(
    "explainer,kind",
    [
        (PatchCE(size=4, stride=2), "patch"),
        (PatchCE(size=1, stride=1, intervention=InterventionSpec(batch_size=128)), "pixel"),
        (SuperpixelCE(n_segments=6), "superpixel"),
        (LatentCE(), "latent"),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_call_selects_the_pairs_of_all_findings(classifier, explainer, kind):
    assert isinstance(explainer, Explainer) and explainer.kind == kind
    x = images()
    every = explainer.all_findings(classifier, x)
    assert every.shape == (3, K, 16, 16)
    img_idx, finding_idx = PAIRS
    maps = explainer(classifier, x, img_idx, finding_idx)
    assert maps.shape == (4, 16, 16)
    torch.testing.assert_close(maps, every[img_idx, finding_idx], atol=1e-6, rtol=0)


def test_each_distinct_image_is_explained_once(classifier, monkeypatch):
    seen = []
    explainer = PatchCE(size=4, stride=4)
    original = explainer._maps
    monkeypatch.setattr(explainer, "_maps", lambda model, x: seen.append(x.shape[0]) or original(model, x))
    explainer(classifier, images(), *PAIRS)
    assert seen == [2]  # images 0 and 2, all findings in one run
    nothing = torch.tensor([], dtype=torch.long)
    assert explainer(classifier, images(), nothing, nothing).shape == (0, 16, 16)


def test_patch_explainer_is_causal_effect(classifier):
    x = images(2)
    options = dict(baseline="constant", baseline_value=0.3, outcome="logit")
    explainer = PatchCE(size=4, stride=2, intervention=InterventionSpec(**options))
    expected = causal_effect(classifier, x, window=4, stride=2, **options)
    torch.testing.assert_close(explainer.all_findings(classifier, x), expected)


def test_single_channel_outcome_gives_the_same_map_to_every_pair(classifier):
    x = images()
    explainer = PatchCE(size=4, stride=4, intervention=InterventionSpec(outcome="ece"))
    every = explainer.all_findings(classifier, x)
    assert every.shape == (3, 1, 16, 16)
    maps = explainer(classifier, x, *PAIRS)
    torch.testing.assert_close(maps, every[PAIRS[0], 0])


def test_noise_baseline_is_reproducible_with_a_seed(classifier):
    explainer = PatchCE(size=4, stride=4, intervention=InterventionSpec(baseline="noise", noise_samples=2, seed=3))
    x = images(1)
    assert torch.equal(explainer.all_findings(classifier, x), explainer.all_findings(classifier, x))


@pytest.mark.parametrize("mask", ["patch", "pixel", "superpixel", "latent"])
def test_hydra_mask_configs_build_working_explainers(classifier, mask, tmp_path):
    try:
        cfg = compose_config("evaluate", [f"mask={mask}"], tmp_path)
    finally:
        GlobalHydra.instance().clear()
    explainer = instantiate(cfg.mask, _convert_="all")
    assert explainer.kind == mask
    x = images(2)
    with torch.inference_mode():
        maps = explainer(classifier, x, torch.tensor([1, 0]), torch.tensor([3, 3]))
    assert maps.shape == (2, 16, 16) and torch.isfinite(maps).all()
    with torch.no_grad():
        again = explainer(classifier, x, torch.tensor([1, 0]), torch.tensor([3, 3]))
    torch.testing.assert_close(maps, again)
    latent = instantiate(cfg.latent, _convert_="all")  # evaluate.yaml's ce_latent
    assert latent.kind == "latent"


def test_inputs_follow_the_models_device_and_dtype():
    model = Classifier(backbone="test_resnet", image_size=16).double().eval()
    for explainer in (PatchCE(size=4, stride=4), LatentCE()):
        maps = explainer.all_findings(model, images(1))  # float32 images, float64 model
        assert maps.dtype == torch.float64 and maps.shape == (1, K, 16, 16)
