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
        ({"name": "pgd", "eps": -0.1}, "attack.eps must be a finite number >= 0"),
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
        ({"name": "pgd", "eps": 0.1, "steps": 0}, "attack.steps must be a whole number >= 1"),
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


# ---------------------------------------------------------------- ranges that keep runs finite


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "pgd", "eps": 5}, r"attack.eps=5.0 is an L-inf radius in \[0,1\] pixel units and must lie in \[0, 1\]"),
        ({"name": "fgsm", "eps": 1.5}, r"attack.eps=1.5 is an L-inf radius"),
        ({"name": "bim", "eps": 2}, r"attack.eps=2.0 is an L-inf radius"),
        ({"name": "apgd", "eps": 5, "norm": "Linf"}, r"attack.eps=5.0 is an L-inf radius"),
        ({"name": "square", "eps": 5, "norm": "Linf"}, r"attack.eps=5.0 is an L-inf radius"),
        ({"name": "pgd", "eps": float("nan")}, "attack.eps must be a finite number >= 0, got nan"),
        ({"name": "pgdl2", "eps": float("inf")}, "attack.eps must be a finite number >= 0, got inf"),
        ({"name": "pgd", "eps": "big"}, "attack.eps must be a number, got 'big'"),
        ({"name": "pgd", "eps": 0.1, "steps": 2.5}, "attack.steps must be a whole number >= 1, got 2.5"),
        ({"name": "pgd", "eps": 0.1, "steps": True}, "attack.steps must be a number, got True"),
        ({"name": "pgd", "eps": 0.1, "steps": "ten"}, "attack.steps must be a number, got 'ten'"),
        ({"name": "bim", "eps": 0.1, "steps": 0}, "attack.steps must be a whole number >= 1, got 0"),
        ({"name": "square", "eps": 0.1, "norm": "Linf", "n_queries": 0}, "attack.n_queries must be a whole number >= 1"),
        ({"name": "square", "eps": 0.1, "norm": "Linf", "n_restarts": -1}, "attack.n_restarts must be a whole number >= 1"),
        ({"name": "apgd", "eps": 0.1, "norm": "Linf", "eot_iter": 0}, "attack.eot_iter must be a whole number >= 1"),
        ({"name": "pgd", "eps": 0.1, "alpha": 0}, "attack.alpha must be a finite number > 0, got 0.0"),
        ({"name": "bim", "eps": 0.1, "alpha": -0.01}, "attack.alpha must be a finite number > 0"),
        ({"name": "pgdl2", "eps": 0.1, "alpha": float("nan")}, "attack.alpha must be a finite number, got nan"),
        ({"name": "cw", "c": 0}, "attack.c must be a finite number > 0"),
        ({"name": "cw", "lr": -1}, "attack.lr must be a finite number > 0"),
        ({"name": "cw", "kappa": -1}, "attack.kappa (CW's confidence margin) must be a finite number >= 0"),
        ({"name": "square", "eps": 0.1, "norm": "Linf", "p_init": 1.5}, "attack.p_init (Square's initial share"),
        ({"name": "square", "eps": 0.1, "norm": "Linf", "p_init": 0}, "must lie in (0, 1], got 0.0"),
        ({"name": "apgd", "eps": 0.1, "norm": "Linf", "rho": 0}, "attack.rho (APGD's step-size halving threshold)"),
    ],
)
def test_out_of_range_attack_settings_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)") if "\\" not in message else message):
        MultiLabelAttack(**kwargs)


@pytest.mark.parametrize("name", ["fgsm", "pgd", "bim"])
def test_linf_eps_bounds_are_inclusive(name, batch):
    images, labels = batch
    extra = {} if name == "fgsm" else {"alpha": None, "steps": 2}
    for eps in (0.0, 1.0):
        out = MultiLabelAttack(name, eps=eps, **extra)(TinyNet(), images, labels)
        assert out.images.min() >= 0 and out.images.max() <= 1


def test_eps_config_override_is_checked_on_instantiation(tmp_path):
    with pytest.raises(Exception, match=r"attack.eps=5.0 is an L-inf radius"):
        _compose_attack("pgd", "attack.eps=5", tmp_path=tmp_path)


@pytest.mark.parametrize(("name", "extra"), [("pgdl2", {"alpha": None, "steps": 2}), ("apgd", {"norm": "L2", "steps": 2})])
def test_l2_eps_at_most_the_norm_of_an_all_ones_image(name, extra, batch):
    images, labels = batch  # 1x12x12: an all-ones image has L2 norm 12
    MultiLabelAttack(name, eps=12.0, **extra)(TinyNet(), images, labels)
    attack = MultiLabelAttack(name, eps=12.5, **extra)  # the bound needs the image size
    with pytest.raises(ValueError, match=r"attack.eps=12.5 is an L2 radius larger than the L2 norm of an all-ones 1x12x12 image \(12\)"):
        attack(TinyNet(), images, labels)


def test_bim_steps_default_is_explicit():
    # torchattacks' BIM reads steps=0 as min(255 eps + 4, 1.25 * 255 eps) steps; ours never passes 0
    attack = MultiLabelAttack("bim", eps=0.5)
    assert attack.params["steps"] == 10
    assert attack.build(TinyNet()).steps == 10


class NaNColumn(TinyNet):
    """TinyNet that does not predict finding B (NaN logits, as XRVClassifier's missing findings)."""

    def forward(self, x):
        out = super().forward(x)
        out = out.clone()
        out[:, 1] = float("nan")
        return out


def test_findings_with_nan_logits_are_never_attacked(batch):
    images, labels = batch
    model = NaNColumn()
    with torch.no_grad():
        model.net[-1].bias[1] = 100.0  # B would be every image's top finding if it were a number
    top = MultiLabelAttack("pgd", eps=0.05, alpha=None, steps=3)(model, images, labels)
    assert not top.attacked[:, 1].any() and top.attacked.sum(1).eq(1).all()
    everything = MultiLabelAttack("pgd", target="all", eps=0.05, alpha=None, steps=3)(model, images, labels)
    assert everything.attacked[:, [0, 2, 3]].all() and not everything.attacked[:, 1].any()
    assert (everything.images - images).abs().sum() > 0 and torch.isfinite(everything.images).all()
    # the mean BCE over the predicted findings rose
    keep = [0, 2, 3]
    clean = F.binary_cross_entropy_with_logits(model(images)[:, keep], labels[:, keep])
    adv = F.binary_cross_entropy_with_logits(model(everything.images)[:, keep], labels[:, keep])
    assert adv > clean
    with pytest.raises(ValueError, match=r"attack.target='B': the classifier does not predict this finding.*A, C, D"):
        MultiLabelAttack("fgsm", target="B", eps=0.01)(model, images, labels)


def test_top_absent_adds_the_likeliest_absent_finding():
    """attack.target=top_absent with mode=targeted to=present: the clinically relevant forgery."""
    logits = torch.tensor([[2.0, -0.5, -3.0, float("nan")], [1.0, 2.0, 0.5, 3.0], [-1.0, -2.0, -0.1, -4.0]])
    attack = MultiLabelAttack("fgsm", target="top_absent", mode="targeted", to="present", eps=0.01)
    # image 0: finding 1 (-0.5) is the likeliest absent one (NaN never wins); image 1 predicts
    # every finding present: falls back to the top one; image 2: finding 2 (-0.1)
    assert attack.image_findings(logits).tolist() == [1, 3, 2]
    assert MultiLabelAttack("fgsm", target="top", eps=0.01).image_findings(logits).tolist() == [0, 3, 2]
