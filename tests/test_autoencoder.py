"""Latent CE through an autoencoder: exact plumbing, a real fit, the cache, the explainer, evaluate.py."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import eval_cfg
from hydra.core.global_hydra import GlobalHydra
from torch import nn

from causal_ie.explain.explainers import LatentCE
from causal_ie.interventions import (
    ActivationAutoencoder,
    AutoencoderSettings,
    AutoencoderSpace,
    autoencoder_space,
    latent_effect,
    latent_split,
    total_variation,
    train_autoencoder,
)
from causal_ie.models import Classifier

pytestmark = pytest.mark.usefixtures("one_thread")

K = 5


def conv_model(channels: int = 6) -> nn.Module:
    """Cut at ``"3"``: a ReLU, so the activation is non-negative."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, K),
    ).eval()


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    torch.manual_seed(0)
    model = Classifier(backbone="test_resnet", image_size=32).eval()
    with torch.no_grad():  # BatchNorms that are not the identity, so every layer matters
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


def images(n: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def identity_autoencoder(channels: int, perm: list[int] | None = None) -> ActivationAutoencoder:
    """hidden = bottleneck = C, centre-tap kernels, zero bias: the identity on A >= 0. With ``perm``
    code channel c is A's channel ``perm[c]`` (the decoder undoes it), so skipping the encoder
    or the decoder shows."""
    eye = torch.eye(channels)
    order = eye[perm] if perm is not None else eye
    ae = ActivationAutoencoder(channels, hidden=channels, bottleneck=channels)
    with torch.no_grad():
        convs = [m for m in (*ae.encoder, *ae.decoder) if isinstance(m, nn.Conv2d)]
        for conv, kernel in zip(convs, (order, eye, eye, order.T)):
            conv.weight.zero_()
            conv.weight[:, :, 1, 1] = kernel
            conv.bias.zero_()
    return ae.eval()


@pytest.mark.parametrize("mode", ["channel", "spatial"])
@pytest.mark.parametrize(
    "which,layer", [("conv", "3"), ("resnet", "backbone.layer2"), ("resnet", "backbone.layer2.0.act1")]
)  # the last one carries the shortcut across the cut
def test_identity_autoencoder_gives_the_activation_space_effects(classifier, which, layer, mode):
    model = conv_model() if which == "conv" else classifier
    size = 16 if which == "conv" else 32
    x = images(size=size)
    split = latent_split(model, layer)
    channels = split.encode(x)[0].shape[1]
    expected = latent_effect(model, x, mode=mode, layer=layer, batch_size=5)
    space = AutoencoderSpace(split, identity_autoencoder(channels))
    got = latent_effect(model, x, mode=mode, space=space, batch_size=5)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert expected.abs().amax() > 1e-4  # the interventions matter
    perm = list(reversed(range(channels)))
    permuted = latent_effect(model, x, mode=mode, space=AutoencoderSpace(split, identity_autoencoder(channels, perm)))
    torch.testing.assert_close(permuted, expected[..., perm] if mode == "channel" else expected, atol=1e-6, rtol=0)


def test_total_variation_of_a_hand_example():
    x = torch.tensor([[0.0, 1.0], [3.0, 3.0]])  # pairs: |1-0|, |3-3| across; |3-0|, |3-1| down
    assert float(total_variation(x)) == pytest.approx((1 + 0 + 3 + 2) / 4)
    assert float(total_variation(torch.ones(1, 2, 1, 1))) == 0.0


def test_training_fits_the_activations_and_leaves_the_classifier_and_rng_alone(classifier):
    batches = [images(8, size=32, seed=s) for s in range(4)]
    before = {name: p.detach().clone() for name, p in classifier.named_parameters()}
    buffers = {name: b.clone() for name, b in classifier.named_buffers()}
    rng = torch.get_rng_state()
    split = latent_split(classifier, "auto")
    ae = train_autoencoder(split, batches, AutoencoderSettings(steps=200, seed=3))
    assert torch.equal(torch.get_rng_state(), rng)
    ratio = float(ae.reconstruction_l1) / float(ae.activation_l1)
    assert float(ae.activation_l1) > 0 and ratio < 0.5, ratio
    with torch.no_grad():  # the recorded error is the real one on these images
        activation = split.encode(batches[0])[0]
        measured = (ae(activation) - activation).abs().mean()
    assert float(measured) < 0.5 * float(activation.abs().mean())
    for name, p in classifier.named_parameters():
        assert p.grad is None and torch.equal(p, before[name]), name
    for name, b in classifier.named_buffers():
        assert torch.equal(b, buffers[name]), name  # eval mode: no BatchNorm statistics updated
    assert not classifier.training and not ae.training
    assert not any(p.requires_grad for p in ae.parameters())
    assert (ae.channels, ae.hidden, ae.bottleneck) == (48, 32, 16)
    again = train_autoencoder(split, lambda: iter(batches), AutoencoderSettings(steps=3, seed=3))  # seeded: same start
    first = train_autoencoder(split, batches, AutoencoderSettings(steps=3, seed=3))
    torch.testing.assert_close(again.state_dict(), first.state_dict(), atol=0, rtol=0)


def test_one_shot_iterators_and_bad_steps_are_named():
    split = latent_split(conv_model(), "3")
    with pytest.raises(ValueError, match="ran out"):
        train_autoencoder(split, iter([images()]), AutoencoderSettings(steps=3))
    with pytest.raises(ValueError, match="steps"):
        train_autoencoder(split, [images()], AutoencoderSettings(steps=0))


def test_autoencoder_space_trains_once_and_caches(tmp_path, caplog):
    model = conv_model()
    calls = []

    def batches():
        calls.append(1)
        return [images(4, seed=s) for s in range(2)]

    small = AutoencoderSettings(hidden=8, bottleneck=4, steps=5)
    settings = dict(cache_dir=tmp_path, key="ckpt-a", settings=small)
    first = autoencoder_space(model, "3", batches, **settings)
    files = list((tmp_path / "autoencoders").glob("*.pt"))
    assert len(files) == 1 and calls == [1, 1, 1]  # 5 steps over passes of 2 batches
    second = autoencoder_space(model, "3", batches, **settings)
    assert len(calls) == 3  # loaded, not trained
    torch.testing.assert_close(second.autoencoder.state_dict(), first.autoencoder.state_dict(), atol=0, rtol=0)
    assert torch.isfinite(second.autoencoder.reconstruction_l1)
    assert second.split is first.split and not second.autoencoder.training

    autoencoder_space(model, "3", batches, **{**settings, "settings": AutoencoderSettings(hidden=8, bottleneck=4, steps=6)})
    autoencoder_space(model, "3", batches, **{**settings, "key": "ckpt-b"})
    assert len(list((tmp_path / "autoencoders").glob("*.pt"))) == 3

    # a cache hit leaves the global generator as a training run does (downstream random
    # starts must not depend on whether the cache was warm)
    state = torch.get_rng_state()
    autoencoder_space(model, "3", batches, **settings)
    assert torch.equal(torch.get_rng_state(), state)
    # fitted or loaded, the autoencoder takes the classifier's dtype
    assert autoencoder_space(model.double(), "3", batches, **settings).autoencoder.encoder[0].weight.dtype == torch.float64
    model.float()

    files[0].write_bytes(b"not a checkpoint")
    calls.clear()
    with caplog.at_level(logging.WARNING, logger="causal_ie.interventions.autoencoder"):
        third = autoencoder_space(model, "3", batches, **settings)
    assert calls and "training it again" in caplog.text
    assert torch.load(files[0], weights_only=True).keys() == third.autoencoder.state_dict().keys()


def test_latent_ce_needs_a_fitted_autoencoder(tmp_path):
    with pytest.raises(ValueError, match=r"latent\.space.*activation.*autoencoder"):
        LatentCE(space="pixels")
    with pytest.raises(ValueError, match=r"latent\.autoencoder.*width"):
        LatentCE(space="autoencoder", autoencoder={"width": 3})
    model, x = conv_model(), images()
    explainer = LatentCE(layer="3", mode="channel", space="autoencoder", autoencoder={"steps": 5, "hidden": 8})
    with pytest.raises(RuntimeError, match="fit_autoencoder"):
        explainer.all_findings(model, x)
    space = explainer.fit_autoencoder(model, lambda: [images(4)], tmp_path, "key")
    assert space.autoencoder.bottleneck == 16
    maps = explainer(model, x, torch.tensor([0, 1]), torch.tensor([2, 4]))
    expected = latent_effect(model, x, mode="channel", space=space, as_maps=True)
    torch.testing.assert_close(maps, expected[[0, 1], [2, 4]], atol=1e-6, rtol=0)
    with pytest.raises(RuntimeError, match="fit_autoencoder"):  # fitted to another classifier
        explainer.all_findings(conv_model(), x)
    with pytest.raises(ValueError, match="autoencoder"):
        LatentCE().fit_autoencoder(model, lambda: [x], tmp_path, "key")


def test_model_moved_to_another_dtype_recuts_and_moves_the_autoencoder(tmp_path):
    model, x = conv_model(), images()
    explainer = LatentCE(layer="3", mode="channel", space="autoencoder", autoencoder={"steps": 3})
    explainer.fit_autoencoder(model, lambda: [images(4)], tmp_path, "key")
    maps = explainer.all_findings(model, x)
    model.double()
    maps64 = explainer.all_findings(model, x.double())
    assert maps64.dtype == torch.float64
    torch.testing.assert_close(maps64.float(), maps, atol=1e-5, rtol=0)


def test_evaluate_with_the_autoencoder_space(tmp_path, checkpoint):
    from causal_ie.evaluation import evaluate

    cache = tmp_path / "cache"
    cfg = eval_cfg(
        tmp_path, checkpoint, "cams=[]", "evaluation.faithfulness=false", "data.test_subset=4",
        "latent.space=autoencoder", "latent.mode=channel", "latent.autoencoder.steps=20", f"paths.cache_dir={cache}",
    )
    try:
        evaluate(cfg)
    finally:
        GlobalHydra.instance().clear()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert 0.0 <= saved["localisation"]["ce_latent"]["pointing_game"] <= 1.0
    assert len(list((cache / "autoencoders").glob("*.pt"))) == 1
    # the run says what the latent CE intervened through and how well it fits
    fit = saved["run"]["ce_latent"]
    assert fit["space"] == "autoencoder" and fit["reconstruction_l1"] < fit["activation_l1"]
    # other training images (another data seed) are another autoencoder
    cfg = eval_cfg(
        tmp_path, checkpoint, "cams=[]", "evaluation.faithfulness=false", "data.test_subset=4", "seed=7",
        "latent.space=autoencoder", "latent.mode=channel", "latent.autoencoder.steps=20", f"paths.cache_dir={cache}",
    )
    try:
        evaluate(cfg)
    finally:
        GlobalHydra.instance().clear()
    assert len(list((cache / "autoencoders").glob("*.pt"))) == 2
