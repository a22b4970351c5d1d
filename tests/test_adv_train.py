"""Adversarial training (`model.adv_train.*`): config, schedule, clean side effects, training, robustness."""

from __future__ import annotations

import copy
import logging
import math

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from causal_ie.attacks import AdversarialTraining, MultiLabelAttack
from causal_ie.models import Classifier
from causal_ie.training import train

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 0.01


def _model(**adv) -> Classifier:
    return Classifier(backbone="test_resnet", image_size=32, adv_train=AdversarialTraining(**adv) if adv else None)


def _batch(n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(n, 1, 32, 32, generator=g),
        "labels": (torch.rand(n, 14, generator=g) < 0.3).float(),
    }


def _bn_state(model: nn.Module) -> list[torch.Tensor]:
    return [
        t.clone()
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for t in (m.running_mean, m.running_var, m.num_batches_tracked)
    ]


def _record_forwards(model: Classifier) -> list[tuple[torch.Tensor, bool]]:
    """Every forward input of ``model`` with the mode it ran in (the attack's passes run in eval mode)."""
    calls: list[tuple[torch.Tensor, bool]] = []
    model.register_forward_pre_hook(lambda mod, args: calls.append((args[0].detach().clone(), mod.training)))
    return calls


def test_config_turns_adversarial_training_on_and_default_is_off(train_cfg):
    model = instantiate(train_cfg("model.adv_train.attack=pgd", f"model.adv_train.eps={EPS}").model, _convert_="all")
    assert isinstance(model, Classifier)
    atk = model.adv_attack
    assert atk is not None and atk.name == "pgd" and atk.eps == EPS
    assert atk.target == "all" and atk.mode == "untargeted"
    assert atk.params == {"steps": 5, "alpha": pytest.approx(2.5 * EPS / 5)}
    assert model.hparams.adv_train == {"attack": "pgd", "eps": EPS, "steps": 5, "alpha": None, "ratio": 0.5}

    default_cfg = train_cfg()
    assert default_cfg.model.adv_train.attack is None
    default = instantiate(default_cfg.model, _convert_="all")
    assert default.adv_attack is None and not any(default.is_adversarial_batch(i) for i in range(4))


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 1.0])
def test_schedule_gives_the_ratio_share_of_batches(ratio):
    model = _model(attack="fgsm", eps=EPS, ratio=ratio)
    flags = [model.is_adversarial_batch(i) for i in range(10)]
    assert sum(flags) == math.floor(10 * ratio)
    assert flags == [model.is_adversarial_batch(i) for i in range(10)]  # no hidden random state
    if ratio == 0.5:
        assert flags[:4] == [False, True, False, True]


def test_ratio_one_trains_on_adversarial_images_inside_the_ball():
    torch.manual_seed(0)
    model = _model(attack="pgd", eps=EPS, ratio=1.0).train()
    batch = _batch()
    calls = _record_forwards(model)
    bn_before = _bn_state(model)
    reference = copy.deepcopy(model)
    loss = model.training_step(batch, 0)

    trained = [x for x, training in calls if training]
    assert len(trained) == 1, "exactly one training-mode forward: the loss's"
    assert len(calls) > 1 and not any(training for _, training in calls[:-1]), "the attack runs in eval mode"
    adv = trained[0]
    delta = (adv - batch["image"]).abs()
    assert delta.max() > EPS / 2  # really perturbed, not the clean batch
    assert delta.max() <= EPS + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    # the loss is the BCE on those images, and BatchNorm saw exactly that one pass
    ref_loss = reference.loss(reference(adv), batch["labels"])
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for got, want in zip(_bn_state(model), _bn_state(reference)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(_bn_state(model), bn_before))


def test_ratio_zero_is_exactly_the_clean_loss():
    torch.manual_seed(0)
    model = _model(attack="pgd", eps=EPS, ratio=0.0).train()
    clean = copy.deepcopy(model)
    batch = _batch()
    calls = _record_forwards(model)
    loss = model.training_step(batch, 3)
    assert len(calls) == 1 and torch.equal(calls[0][0], batch["image"])
    assert torch.equal(loss, clean.loss(clean(batch["image"]), batch["labels"]))


def test_attack_leaves_grads_modes_and_batchnorm_stats_alone():
    torch.manual_seed(0)
    model = _model(attack="pgd", eps=EPS, ratio=1.0).train()
    batch = _batch()
    bn_before = _bn_state(model)
    model.adversarial_images(batch["image"], batch["labels"])
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training for m in model.modules())
    for got, want in zip(_bn_state(model), bn_before):
        assert torch.equal(got, want)

    # existing gradients (e.g. accumulation) stay as they were; a frozen submodule stays in eval mode
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    frozen = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).eval()
    model.training_step(batch, 0)
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert model.training and not frozen.training
    assert sum(m.training for m in model.modules()) == len(list(model.modules())) - 1

    model.eval()
    model.adversarial_images(batch["image"], batch["labels"])
    assert not any(m.training for m in model.modules())


def test_tiny_adversarial_training_run_saves_a_loadable_checkpoint(train_cfg, tmp_path):
    cfg = train_cfg("model.adv_train.attack=pgd", f"model.adv_train.eps={EPS}", "model.adv_train.steps=2", "test=false")
    metrics, objects = train(cfg)
    assert metrics["train/adv_batch"] == 1.0  # batch 1 of 2 is adversarial at ratio 0.5
    assert math.isfinite(metrics["train/loss"])
    best = objects["trainer"].checkpoint_callback.best_model_path
    loaded = Classifier.load(best)  # weights_only=True
    assert loaded.hparams.adv_train == {"attack": "pgd", "eps": EPS, "steps": 2, "alpha": None, "ratio": 0.5}
    assert loaded.adv_attack is None  # recorded; a loaded model is evaluated (train.py resumes from the config)
    assert loaded(torch.rand(2, 1, 32, 32)).shape == (2, 14)


def test_checkpoint_without_adv_train_still_loads(tmp_path):
    model = _model()
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert "adv_train" in ckpt["hyper_parameters"]
    del ckpt["hyper_parameters"]["adv_train"]  # as written before adversarial training existed
    torch.save(ckpt, path)
    loaded = Classifier.load(path)
    assert loaded.adv_attack is None and loaded.hparams.adv_train is None


@pytest.mark.parametrize(
    ("adv", "match"),
    [
        ({"attack": "pgd", "ratio": 1.5}, r"model\.adv_train\.ratio must be a finite number in \[0, 1\]"),
        ({"attack": None, "ratio": -0.1}, r"model\.adv_train\.ratio"),
        ({"attack": "cw"}, r"model\.adv_train\.attack='cw' cannot attack all findings.*fgsm, bim, pgd, pgdl2"),
        ({"attack": "apgd"}, r"model\.adv_train\.attack='apgd' cannot attack all findings"),
        ({"attack": "nope"}, r"model\.adv_train\.attack='nope' is not known"),
        ({"attack": "pgd", "steps": 0}, r"model\.adv_train\.steps must be a whole number >= 1"),
        ({"attack": "pgd", "eps": "big"}, r"model\.adv_train\.eps must be a number"),
        ({"attack": "fgsm", "alpha": 0.01}, r"model\.adv_train\.alpha: fgsm"),
    ],
)
def test_bad_settings_name_the_key(adv, match):
    with pytest.raises(ValueError, match=match):
        _model(**adv)


def test_unknown_key_is_refused_and_a_mapping_is_only_recorded(train_cfg, caplog):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="epsilon"):
        train_cfg("model.adv_train.epsilon=0.01")
    # settings as a mapping (what Lightning's load_from_checkpoint passes) are recorded, with a warning: no training
    with caplog.at_level(logging.WARNING, logger="causal_ie.models.classifier"):
        recorded = Classifier(backbone="test_resnet", image_size=32, adv_train={"attack": "pgd", "eps": 0.01})
    assert recorded.adv_attack is None and recorded.hparams.adv_train == {"attack": "pgd", "eps": 0.01}
    assert "no adversarial training" in caplog.text


@pytest.mark.slow
def test_adversarial_training_makes_the_tiny_model_more_robust():
    """Same data, init and steps: PGD training leaves a much smaller PGD loss increase."""
    from causal_ie.data.sources import SyntheticDataModule

    eps = 0.03
    dm = SyntheticDataModule(
        image_size=32, batch_size=16, seed=0, augment=False,
        synthetic={"num_train": 128, "num_val": 32, "num_test": 16},
    )
    dm.setup("fit")
    probe = MultiLabelAttack("pgd", target="all", eps=eps, alpha=None, steps=10)
    val = next(iter(dm.val_dataloader()))

    def pgd_loss_increase(adv_train: dict | None) -> float:
        L.seed_everything(0)
        training = AdversarialTraining(**adv_train) if adv_train else None
        model = Classifier(backbone="test_resnet", image_size=32, adv_train=training).train()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        step = 0
        while step < 64:
            for batch in dm.train_dataloader():
                loss = model.training_step(batch, step)
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                if step == 64:
                    break
        model.eval()
        x, y = val["image"], val["labels"]
        x_adv = probe(model, x, y).images
        with torch.no_grad():
            return (model.loss(model(x_adv), y) - model.loss(model(x), y)).item()

    standard = pgd_loss_increase(None)
    robust = pgd_loss_increase({"attack": "pgd", "eps": eps, "steps": 3, "ratio": 1.0})
    assert standard > 0.3  # the attack does hurt the standard model
    assert robust < 0.5 * standard, (robust, standard)
