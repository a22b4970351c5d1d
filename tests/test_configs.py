"""Every config group composes, and the objects it names can be built."""

from __future__ import annotations

import pytest
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf, open_dict

from conftest import CONF, compose_config

GROUPS = ["data", "model", "trainer", "logger", "callbacks", "experiment", "debug"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in options(g)], ids=lambda v: str(v)
)
def test_group_option_composes(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    cfg = compose_config("train", overrides, tmp_path)
    if "root" in cfg.data.keys():  # required (???) for the data sets read from disk
        cfg = compose_config("train", [*overrides, "data.root=/nonexistent"], tmp_path)
    # every interpolation resolves and every _target_ names a real class/function
    with open_dict(cfg):
        cfg.pop("hydra")
    OmegaConf.resolve(cfg)
    for target in _targets(cfg):
        assert callable(get_object(target)), target


def _targets(cfg):
    found = []

    def walk(node):
        if OmegaConf.is_dict(node):
            for k, v in node.items():
                if k == "_target_":
                    found.append(v)
                else:
                    walk(v)
        elif OmegaConf.is_list(node):
            for v in node:
                walk(v)

    walk(cfg)
    return found


PRETRAINED = ("xrv",)  # explained as they are (evaluate.py model=...), not trained


def test_every_model_config_builds(tmp_path):
    trainable = [o for o in options("model") if o not in PRETRAINED]
    assert {"tiny", "resnet18", "resnet50", "densenet121", "efficientnet_b0"} <= set(trainable)
    for option in trainable:
        cfg = compose_config("train", [f"model={option}", "data.image_size=32"], tmp_path)
        model = instantiate(cfg.model)
        assert model.hparams.backbone == cfg.model.backbone
        assert model.hparams.image_size == 32
    for option in PRETRAINED:
        cfg = compose_config("evaluate", [f"model={option}", "model.weights=random", "model.input_resolution=32"], tmp_path)
        assert instantiate(cfg.model).hparams.backbone.startswith(f"{option}:")


def test_training_a_pretrained_model_config_is_refused_clearly(tmp_path):
    from causal_ie.training import train

    cfg = compose_config("train", ["model=xrv", "model.weights=random", "logger=none"], tmp_path)
    with pytest.raises(ValueError, match="XRVClassifier, a pretrained classifier.*evaluate.py"):
        train(cfg)


def test_chexnet_experiment_recipe(tmp_path):
    cfg = compose_config("train", ["experiment=chexnet", "data.root=/data/nih"], tmp_path)
    assert cfg.model.backbone == "densenet121"
    assert cfg.model.pretrained is True
    assert cfg.data._target_.endswith("NIHDataModule") and cfg.data.image_size == 224 and cfg.data.batch_size == 16
    assert cfg.model.optimizer.lr == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "config,group,option",
    [("evaluate", "mask", o) for o in options("mask")]
    + [("evaluate", "trainer", o) for o in options("trainer")]
    + [("evaluate", "attack", o) for o in options("attack")]
    + [("counterfactuals", "counterfactual", o) for o in options("counterfactual")],
    ids=lambda v: str(v),
)
def test_evaluation_config_groups_compose(config, group, option, tmp_path):
    cfg = compose_config(config, [f"{group}={option}"], tmp_path)
    with open_dict(cfg):
        cfg.pop("hydra")
    OmegaConf.resolve(cfg)
    for target in _targets(cfg):
        assert callable(get_object(target)), target


@pytest.mark.parametrize(
    "overrides,space,mode",
    [
        (["mask=latent", "latent.space=autoencoder", "latent.mode=channel"], "autoencoder", "channel"),
        (["mask=latent", "mask.space=autoencoder", "mask.autoencoder.steps=3"], "autoencoder", "spatial"),
        (["mask=latent", "latent=null"], "activation", "spatial"),
    ],
)
def test_latent_mask_follows_the_latent_block(overrides, space, mode, tmp_path):
    """`mask=latent latent.space=autoencoder` (the paper's code) configures the main (latent) CE."""
    cfg = compose_config("evaluate", overrides, tmp_path)
    explainer = instantiate(cfg.mask, _convert_="all")
    assert (explainer.space, explainer.mode) == (space, mode)
    assert explainer.autoencoder.steps == (3 if "mask.autoencoder.steps=3" in overrides else 500)


@pytest.mark.parametrize("config", ["train", "evaluate"])
def test_disabling_the_trainer_progress_bar_drops_the_progress_bar_callback(config, tmp_path):
    from lightning.pytorch.callbacks import ProgressBar

    from causal_ie.runs import build_callbacks

    shown = build_callbacks(compose_config(config, [], tmp_path))
    assert any(isinstance(c, ProgressBar) for c in shown)
    hidden = build_callbacks(compose_config(config, ["+trainer.enable_progress_bar=false"], tmp_path))
    assert not any(isinstance(c, ProgressBar) for c in hidden)
    instantiate(compose_config(config, ["+trainer.enable_progress_bar=false"], tmp_path).trainer, callbacks=hidden)
