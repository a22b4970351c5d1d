"""Multi-label attacks: the wrapper's loss is BCE, every attack config stays in its ball, bad input fails clearly."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from torch import nn
from torch.nn import functional as F

from causal_ie.attacks import ATTACKS, FindingLogits, MultiLabelAttack

pytestmark = pytest.mark.usefixtures("one_thread")

FINDINGS = ("A", "B", "C", "D")


class TinyNet(nn.Module):
    """A small conv net with named findings, like the Classifier (inputs in [0, 1])."""

    findings = FINDINGS

    def __init__(self, k: int = len(FINDINGS)):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64, k)
        )

    def forward(self, x):
        return 4 * self.net(x - 0.5)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(6, 1, 12, 12, generator=g)
    labels = (torch.rand(6, len(FINDINGS), generator=g) > 0.5).float()
    return images, labels


def test_finding_logits_softmax_ce_equals_bce_of_that_finding(batch):
    images, labels = batch
    model = TinyNet()
    z = model(images)
    for k in range(len(FINDINGS)):
        ce = F.cross_entropy(FindingLogits(model, k)(images), labels[:, k].long(), reduction="none")
        bce = F.binary_cross_entropy_with_logits(z[:, k], labels[:, k], reduction="none")
        torch.testing.assert_close(ce, bce, rtol=1e-5, atol=1e-6)


def test_finding_logits_all_gives_mean_bce_over_findings(batch):
    images, labels = batch
    model = TinyNet()
    logits = FindingLogits(model, None)(images)
    assert logits.shape == (6, 2, len(FINDINGS))
    ce = F.cross_entropy(logits, labels.long())
    torch.testing.assert_close(ce, F.binary_cross_entropy_with_logits(model(images), labels), rtol=1e-5, atol=1e-6)


def _compose_attack(name: str, *overrides: str, tmp_path):
    cfg = compose_config("evaluate", [f"attack={name}", *overrides], tmp_path)
    GlobalHydra.instance().clear()
    return instantiate(cfg.attack, _convert_="all")


# short runs, and balls big enough that APGD/Square (which return the clean image where
# they fail) flip some predictions of the tiny net
SMALL = {
    "cw": ["attack.steps=5"],
    "square": ["attack.n_queries=100", "attack.eps=0.2"],
    "apgd": ["attack.steps=5", "attack.eps=0.1"],
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_config_stays_in_its_ball_and_the_box(name, batch, tmp_path):
    attack = _compose_attack(name, "attack.target=top", *SMALL.get(name, []), tmp_path=tmp_path)
    assert isinstance(attack, MultiLabelAttack) and attack.name == name
    images, labels = batch
    out = attack(TinyNet(), images, labels)
    adv = out.images
    assert adv.shape == images.shape
    assert adv.min() >= 0 and adv.max() <= 1
    delta = (adv - images).flatten(1)
    if attack.eps is not None:
        norm = delta.abs().amax(1) if attack.norm == "Linf" else delta.norm(dim=1)
        assert (norm <= attack.eps * (1 + 1e-4) + 1e-6).all(), (name, norm.max().item(), attack.eps)
    # the attack moved the images (a zero perturbation would pass the ball check trivially)
    assert delta.abs().sum() > 0
    # `top` attacks exactly one finding per image, the clean prediction's top one
    assert out.attacked.sum(1).eq(1).all()
    assert torch.equal(out.attacked.float().argmax(1), TinyNet()(images).argmax(1))


def test_evaluate_config_has_no_attack_by_default(tmp_path):
    cfg = compose_config("evaluate", [], tmp_path)
    GlobalHydra.instance().clear()
    assert not cfg.get("attack")


@pytest.mark.parametrize("name", ["fgsm", "bim", "pgd", "pgdl2"])
def test_target_all_raises_bce_over_all_findings(name, batch):
    images, labels = batch
    model = TinyNet()
    eps = 0.5 if name == "pgdl2" else 0.03
    out = MultiLabelAttack(name, target="all", eps=eps, **({} if name == "fgsm" else {"alpha": None, "steps": 5}))(
        model, images, labels
    )
    assert out.attacked.all()
    clean = F.binary_cross_entropy_with_logits(model(images), labels, reduction="none").mean(1)
    adv = F.binary_cross_entropy_with_logits(model(out.images), labels, reduction="none").mean(1)
    assert (adv > clean).all(), (clean, adv)


def test_named_target_attacks_only_that_finding(batch):
    images, labels = batch
    model = TinyNet()
    out = MultiLabelAttack("pgd", target="C", eps=0.05, alpha=None, steps=10)(model, images, labels)
    assert out.attacked[:, 2].all() and not out.attacked[:, [0, 1, 3]].any()
    clean = F.binary_cross_entropy_with_logits(model(images)[:, 2], labels[:, 2], reduction="none")
    adv = F.binary_cross_entropy_with_logits(model(out.images)[:, 2], labels[:, 2], reduction="none")
    assert (adv > clean).all()


@pytest.mark.parametrize("name", ["pgd", "apgd"])
@pytest.mark.parametrize("to", ["present", "absent"])
def test_targeted_pushes_the_finding_to_the_goal(name, to, batch):
    images, labels = batch
    model = TinyNet()
    extra = {"norm": "Linf", "steps": 10} if name == "apgd" else {"alpha": None, "steps": 10}
    # A is predicted present (p ~ 0.6) in every image, C absent in most (p ~ 0.45)
    k = 2 if to == "present" else 0
    out = MultiLabelAttack(name, target=FINDINGS[k], mode="targeted", to=to, eps=0.1, **extra)(model, images, labels)
    before, after = model(images)[:, k], model(out.images)[:, k]
    assert out.targeted and (out.goal[:, k] == (1.0 if to == "present" else 0.0)).all()
    moved = (after - before) * (1 if to == "present" else -1)
    # never away from the goal, and some images strictly towards it (APGD returns the
    # clean image where it fails and leaves images already at the goal alone)
    assert (moved >= -1e-5).all() and (moved > 1e-3).any(), moved


@pytest.mark.parametrize("training", [False, True])
def test_attack_keeps_the_model_mode_and_batchnorm_statistics(training, batch):
    images, labels = batch
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.LazyLinear(4))
    model(images)  # materialise the lazy layer
    model.train(training)
    stats = [t.clone() for t in (model[1].running_mean, model[1].running_var)]
    for name in ("pgd", "apgd"):
        extra = {"norm": "Linf"} if name == "apgd" else {"alpha": None}
        MultiLabelAttack(name, eps=0.05, steps=3, **extra)(model, images, labels, FINDINGS)
        assert model.training is training and all(m.training is training for m in model.modules())
        torch.testing.assert_close([model[1].running_mean, model[1].running_var], stats, rtol=0, atol=0)


def test_eps_zero_leaves_images_unchanged(batch):
    images, labels = batch
    out = MultiLabelAttack("pgd", eps=0.0, alpha=None, steps=3)(TinyNet(), images, labels)
    torch.testing.assert_close(out.images, images)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "pgd", "eps": -0.1}, "attack.eps must be >= 0"),
        ({"name": "deepfool", "eps": 0.1}, "attack='deepfool' is not known"),
        ({"name": "apgd", "eps": 0.1}, "attack=apgd needs attack.norm: Linf or L2"),
        ({"name": "square", "eps": 0.1, "norm": "L1"}, "attack.norm='L1': expected Linf or L2"),
        ({"name": "pgd", "eps": 0.1, "norm": "L2"}, "use attack=pgdl2"),
        ({"name": "pgd"}, "attack=pgd needs attack.eps"),
        ({"name": "cw", "eps": 0.1}, "has no attack.eps"),
        ({"name": "pgd", "eps": 0.1, "stepz": 3}, "attack=pgd has no parameter stepz"),
        ({"name": "cw", "target": "all"}, "cannot attack target=all"),
        ({"name": "apgd", "eps": 0.1, "norm": "Linf", "loss": "dlr"}, "use attack.loss=ce"),
        ({"name": "pgd", "eps": 0.1, "mode": "evil"}, "attack.mode='evil'"),
        ({"name": "pgd", "eps": 0.1, "steps": 0}, "attack.steps must be >= 1"),
    ],
)
def test_bad_attack_settings_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MultiLabelAttack(**kwargs)


def test_unknown_finding_name_is_a_clear_error(batch):
    images, labels = batch
    attack = MultiLabelAttack("fgsm", target="Pneumothorax", eps=0.01)
    with pytest.raises(ValueError, match=r"attack.target='Pneumothorax' is not a finding.*A, B, C, D"):
        attack(TinyNet(), images, labels)


def test_inputs_outside_the_unit_box_are_rejected(batch):
    images, labels = batch
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        MultiLabelAttack("fgsm", eps=0.01)(TinyNet(), images * 3, labels)
