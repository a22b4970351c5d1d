"""Classifier and backbone factory: shapes, normalisation, weights files, checkpoints."""

from __future__ import annotations

import lightning as L
import pytest
import timm
import torch

from causal_ie.data.findings import FINDINGS
from causal_ie.models import Classifier, Normalize, PretrainedWeightsError, create_backbone


def test_forward_takes_unit_images_and_gives_14_logits():
    model = Classifier(backbone="test_resnet", image_size=32).eval()
    x = torch.rand(3, 1, 32, 32)
    logits = model(x)
    assert logits.shape == (3, len(FINDINGS))
    # normalisation lives inside the model: forward == backbone(normalised x)
    expected = model.backbone((x - 0.449) / 0.226)
    torch.testing.assert_close(logits, expected)


def test_normalize_rejects_bad_constants():
    with pytest.raises(ValueError, match="model.std"):
        Normalize(0.5, 0.0, 1)
    with pytest.raises(ValueError, match="1 or 3 values"):
        Normalize([0.1, 0.2], 0.2, 3)


def test_unknown_backbone_names_the_key():
    with pytest.raises(ValueError, match="model.backbone='resnet_does_not_exist'"):
        create_backbone("resnet_does_not_exist", num_classes=14)


def test_local_weights_file_is_adapted_to_grayscale(tmp_path):
    # an ImageNet-style RGB, 1000-class state dict, as a user would copy it offline
    rgb = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(rgb.state_dict(), path)
    gray = create_backbone("resnet18", num_classes=14, in_chans=1, checkpoint=path)
    torch.testing.assert_close(gray.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True))
    torch.testing.assert_close(gray.layer1[0].conv1.weight, rgb.layer1[0].conv1.weight)
    assert gray.fc.out_features == 14


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.checkpoint="):
        create_backbone("resnet18", num_classes=14, checkpoint=tmp_path / "nope.pth")


def test_pretrained_without_hub_is_a_clear_error(monkeypatch):
    # simulate the offline hub: timm's download raises
    def offline(*args, **kwargs):
        raise OSError("hub unreachable")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", offline)
    with pytest.raises(PretrainedWeightsError, match="model.checkpoint=/path/to/file"):
        create_backbone("resnet18", num_classes=14, pretrained=True)


def test_bce_loss_and_pos_weight():
    model = Classifier(backbone="test_resnet", pos_weight=[2.0] * 14)
    logits = torch.zeros(2, 14)
    labels = torch.ones(2, 14)
    # BCE(0, 1) = log 2, doubled by pos_weight
    assert model.loss(logits, labels).item() == pytest.approx(2 * torch.log(torch.tensor(2.0)).item())
    with pytest.raises(ValueError, match="pos_weight has 3 values"):
        Classifier(backbone="test_resnet", pos_weight=[1.0, 1.0, 1.0])


def test_checkpoint_round_trip_weights_only(tmp_path):
    model = Classifier(backbone="test_resnet", image_size=32)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = Classifier.load(path)  # uses torch.load(weights_only=True)
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(loaded(x), model.eval()(x))
    assert loaded.hparams.image_size == 32 and loaded.findings == FINDINGS


def test_load_rejects_foreign_checkpoint(tmp_path):
    path = tmp_path / "weights.ckpt"
    torch.save({"model": {}}, path)
    with pytest.raises(ValueError, match="not a causal_ie Classifier checkpoint"):
        Classifier.load(path)
