"""Classifier and backbone factory: shapes, normalisation, weights files, checkpoints."""

from __future__ import annotations

import lightning as L
import pytest
import timm
import torch
from conftest import TINY_TRAIN, compose_config
from hydra.utils import instantiate

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


def save_lightning_checkpoint(model: Classifier, path):
    """``model`` saved as train.py's Lightning checkpoints are, without training."""
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    return path


def test_checkpoint_round_trip_weights_only(tmp_path):
    model = Classifier(backbone="test_resnet", image_size=32)
    path = save_lightning_checkpoint(model, tmp_path / "model.ckpt")
    loaded = Classifier.load(path)  # uses torch.load(weights_only=True)
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(loaded(x), model.eval()(x))
    assert loaded.hparams.image_size == 32 and loaded.findings == FINDINGS


def test_load_rejects_foreign_checkpoint(tmp_path):
    path = tmp_path / "weights.ckpt"
    torch.save({"model": {}}, path)
    with pytest.raises(ValueError, match="not a causal_ie Classifier checkpoint"):
        Classifier.load(path)


# ---------------------------------------------------------------- corrupt or foreign checkpoint files


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    """A real train.py-style Lightning checkpoint of a small classifier."""
    model = Classifier(backbone="test_resnet", image_size=32)
    return save_lightning_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "best.ckpt")


def _expect_load_error(path, *fragments):
    with pytest.raises(ValueError) as err:
        Classifier.load(path)
    message = str(err.value)
    assert str(path) in message, message  # names the file
    assert "Lightning checkpoint written by train.py" in message and "checkpoints/best.ckpt" in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_load_text_file_names_the_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("remember to train the model first\n")
    message = _expect_load_error(path, "not a torch checkpoint")
    assert "Unsupported operand" not in message.split("(")[0]


def test_load_empty_file_names_the_file(tmp_path):
    path = tmp_path / "best.ckpt"
    path.touch()
    _expect_load_error(path, "is empty")


def test_load_truncated_checkpoint_names_the_file(tmp_path, saved_checkpoint):
    data = saved_checkpoint.read_bytes()
    path = tmp_path / "best.ckpt"
    path.write_bytes(data[: len(data) // 2])
    _expect_load_error(path, "truncated or corrupt")


class NotACheckpoint:
    """Some object a user might have saved with torch.save."""


@pytest.mark.parametrize("obj", ["list", "tensor", "object", "plain_pickle"])
def test_load_pickle_of_something_else_names_the_file(obj, tmp_path):
    import pickle

    path = tmp_path / "other.ckpt"
    if obj == "list":
        torch.save([1, 2, 3], path)
        _expect_load_error(path, "holds a list")
    elif obj == "tensor":
        torch.save(torch.zeros(3), path)
        _expect_load_error(path, "holds a Tensor")
    elif obj == "object":  # torch.save of an arbitrary class: weights_only refuses it
        torch.save(NotACheckpoint(), path)
        _expect_load_error(path, "holds objects other than tensors", "NotACheckpoint")
    else:
        with path.open("wb") as f:
            pickle.dump({"state_dict": {}}, f, protocol=2)
        _expect_load_error(path, "not a torch checkpoint but a plain pickle")


def test_load_state_dict_without_hyper_parameters_names_the_file(tmp_path):
    model = Classifier(backbone="test_resnet", image_size=32)
    bare = tmp_path / "weights.pt"
    torch.save(model.state_dict(), bare)
    _expect_load_error(bare, "no 'hyper_parameters'")
    nested = tmp_path / "nested.ckpt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, nested)
    _expect_load_error(nested, "no 'hyper_parameters'", "found keys ['epoch', 'state_dict']")


def test_load_checkpoint_of_a_different_model_names_the_file(tmp_path, saved_checkpoint):
    ckpt = torch.load(saved_checkpoint, weights_only=True)
    ckpt["hyper_parameters"]["not_a_setting"] = 1
    path = tmp_path / "newer.ckpt"
    torch.save(ckpt, path)
    _expect_load_error(path, "hyper_parameters", "not_a_setting")
    ckpt = torch.load(saved_checkpoint, weights_only=True)
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if "fc" not in k}
    path = tmp_path / "partial.ckpt"
    torch.save(ckpt, path)
    _expect_load_error(path, "weights do not fit", "fc")


def test_load_directory_or_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Classifier.load(tmp_path / "missing.ckpt")
    with pytest.raises(FileNotFoundError, match="is a directory"):
        Classifier.load(tmp_path)


def test_optimizer_and_scheduler_are_partial_configs_recorded_in_the_checkpoint(tmp_path):
    cfg = compose_config("train", [*TINY_TRAIN, "model.optimizer.lr=0.02", "model.scheduler.patience=3"], tmp_path)
    model = instantiate(cfg.model, _convert_="all")
    configured = model.configure_optimizers()
    opt, sched = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["lr"] == 0.02 and tuple(opt.defaults["betas"]) == (0.9, 0.999)
    assert isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau) and sched.patience == 3
    assert configured["lr_scheduler"]["monitor"] == "val/loss"
    assert model.hparams.optimizer == {"_target_": "torch.optim.adam.Adam", "lr": 0.02, "betas": [0.9, 0.999],
                                       "weight_decay": 0.0}
    # Lightning's own loader rebuilds both from the recorded target and arguments
    path = save_lightning_checkpoint(model, tmp_path / "partial.ckpt")
    again = Classifier.load_from_checkpoint(path, map_location="cpu").configure_optimizers()
    assert again["optimizer"].defaults["lr"] == 0.02 and again["lr_scheduler"]["scheduler"].patience == 3
    constant = instantiate(compose_config("train", [*TINY_TRAIN, "model.scheduler=null"], tmp_path).model, _convert_="all")
    assert isinstance(constant.configure_optimizers(), torch.optim.Adam) and constant.hparams.scheduler is None
    sgd = instantiate(compose_config("train", [*TINY_TRAIN, "model.optimizer._target_=torch.optim.SGD",
                                               "~model.optimizer.betas"], tmp_path).model, _convert_="all")
    assert isinstance(sgd.configure_optimizers()["optimizer"], torch.optim.SGD)


def test_a_checkpoint_from_before_partial_optimizers_still_loads(tmp_path):
    model = Classifier(backbone="test_resnet", image_size=32)
    path = save_lightning_checkpoint(model, tmp_path / "old.ckpt")
    ckpt = torch.load(path, weights_only=True)
    hp = ckpt["hyper_parameters"]
    del hp["optimizer"], hp["scheduler"]
    hp.update(lr=3e-4, weight_decay=0.0, betas=[0.9, 0.99], lr_factor=0.5, lr_patience=4)  # the old keys
    torch.save(ckpt, path)
    for loaded in (Classifier.load(path), Classifier.load_from_checkpoint(path, map_location="cpu")):
        configured = loaded.configure_optimizers()  # the old keys still say how it trains
        assert configured["optimizer"].defaults["lr"] == 3e-4 and tuple(configured["optimizer"].defaults["betas"]) == (0.9, 0.99)
        assert configured["lr_scheduler"]["scheduler"].patience == 4 and configured["lr_scheduler"]["scheduler"].factor == 0.5
        assert loaded.hparams.optimizer["lr"] == 3e-4
        assert torch.equal(loaded.eval()(torch.zeros(1, 1, 32, 32)), model.eval()(torch.zeros(1, 1, 32, 32)))
