"""torchattacks attacks on a multi-label classifier, built from the ``attack`` Hydra group.

``MultiLabelAttack`` holds what ``conf/attack/<name>.yaml`` says (the attack,
its torchattacks parameters, which findings to attack and how) and, called on
a classifier and a batch, returns the adversarial images. The attack itself is
torchattacks' own; :class:`~causal_ie.attacks.wrapper.FindingLogits` makes the
multi-label model look like the softmax classifier torchattacks expects.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torchattacks
from torch import Tensor, nn

from causal_ie.attacks.wrapper import FindingLogits
from causal_ie import validators
from causal_ie.runtime import eval_mode

ATTACKS: dict[str, type[torchattacks.Attack]] = {
    "fgsm": torchattacks.FGSM,
    "bim": torchattacks.BIM,
    "pgd": torchattacks.PGD,
    "pgdl2": torchattacks.PGDL2,
    "cw": torchattacks.CW,
    "apgd": torchattacks.APGD,
    "square": torchattacks.Square,
}
# attacks whose norm is fixed by the method; apgd and square take `norm` from the config
FIXED_NORM = {"fgsm": "Linf", "bim": "Linf", "pgd": "Linf", "pgdl2": "L2", "cw": "L2"}
# attacks that only evaluate CrossEntropyLoss(logits, labels), so the [N, 2, K] logits of
# `target=all` work; the others index logits per sample (margins, restarts on subsets)
LOSS_ONLY = ("fgsm", "bim", "pgd", "pgdl2")
# step size 2.5 * eps / steps when alpha is not given (Madry et al. 2018)
STEP_SIZE_FACTOR = 2.5
TARGETS_HELP = (
    "'top' (each image's most likely finding), 'top_absent' (each image's most likely finding among those it "
    "predicts absent: with mode=targeted to=present, adding a finding), 'all' (every finding) or a finding name"
)
PER_IMAGE_TARGETS = ("top", "top_absent")


def _number(key: str, value: Any) -> float:
    """``attack.<key>`` as a float (its range is checked where it is used)."""
    return validators.number(f"attack.{key}", value)


def _count(key: str, value: Any) -> int:
    """``attack.<key>`` as a whole number >= 1 (2.5 steps is a typo, not 2)."""
    return validators.count(f"attack.{key}", value)


@dataclass
class Adversarial:
    """Adversarial images and what the attack aimed at.

    ``attacked`` [N, K] marks the attacked findings of each image; ``goal`` [N, K]
    holds, for those, the label the attack tried to move the prediction away from
    (untargeted: the true label) or towards (targeted).
    """

    images: Tensor
    attacked: Tensor
    goal: Tensor
    targeted: bool


class _Columns(nn.Module):
    """``model``'s logits restricted to ``columns`` (the findings it predicts), in its training mode."""

    def __init__(self, model: nn.Module, columns: Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("columns", columns.detach().clone().long())
        self.train(model.training)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x).index_select(1, self.columns.to(x.device))


class MultiLabelAttack:
    """A torchattacks attack against a multi-label classifier (``conf/attack/*.yaml``).

    Args:
        name: one of ``fgsm, bim, pgd, pgdl2, cw, apgd, square``.
        target: ``top`` attacks each image's most likely finding, ``top_absent`` its most
            likely absent one (with ``mode=targeted to=present``: adding a finding), ``all``
            the whole label vector (BCE over all findings; FGSM/BIM/PGD/PGD-L2 only), a
            finding name that finding in every image.
        mode: ``untargeted`` pushes the attacked findings away from their true labels;
            ``targeted`` pushes them to ``to`` (``present`` or ``absent``).
        eps: radius of the perturbation ball in [0, 1] pixel units (L-inf or L2 as
            ``norm``); CW is unbounded and takes none.
        norm: ``Linf`` or ``L2`` for APGD and Square; the others have a fixed norm.
        adaptive: the attack study also runs an attacker who knows the CE detector
            (:class:`~causal_ie.attacks.adaptive_study.AdaptiveStudy`), with this attack's eps,
            steps and target.
        **params: the torchattacks class's own arguments (``alpha``, ``steps``, ``c``, ...).
            ``alpha: null`` means 2.5 * eps / steps.
    """

    def __init__(
        self,
        name: str,
        target: str = "top",
        mode: str = "untargeted",
        to: str = "present",
        eps: float | None = None,
        norm: str | None = None,
        adaptive: bool = False,
        **params: Any,
    ):
        self.name = str(name).lower()
        self.adaptive = bool(adaptive)
        if self.name not in ATTACKS:
            raise ValueError(f"attack={name!r} is not known; expected one of {', '.join(ATTACKS)}")
        self.norm = self._check_norm(norm)
        self.eps = self._check_eps(eps)
        if mode not in ("untargeted", "targeted"):
            raise ValueError(f"attack.mode={mode!r}: expected 'untargeted' or 'targeted'")
        if to not in ("present", "absent"):
            raise ValueError(f"attack.to={to!r}: expected 'present' or 'absent' (where a targeted attack pushes findings)")
        self.mode, self.to = mode, to
        self.target = str(target)
        if self.target == "all" and self.name not in LOSS_ONLY:
            raise ValueError(
                f"attack={self.name} cannot attack target=all: its loss compares one logit against the "
                f"others per image; use attack.target=top or a finding name, or attack={'/'.join(LOSS_ONLY)}"
            )
        self.params = self._check_params(params)

    # -- validation ---------------------------------------------------------------
    def _check_norm(self, norm: str | None) -> str:
        fixed = FIXED_NORM.get(self.name)
        given = None if norm is None else validators.norm("attack.norm", norm)
        if fixed is None:
            if given is None:
                raise ValueError(f"attack={self.name} needs attack.norm: Linf or L2")
            return given
        if given is not None and given != fixed:
            other = "pgdl2" if given == "L2" else "pgd"
            raise ValueError(f"attack={self.name} is an {fixed} attack, not {given}; use attack={other}")
        return fixed

    def _check_eps(self, eps: float | None) -> float | None:
        """``attack.eps`` as a float: finite, >= 0 (0 leaves images unchanged, a control), and for
        L-inf at most 1, the whole [0, 1] pixel range (the L2 bound needs the image size and is
        checked when the images come, :meth:`check_eps_fits`)."""
        if self.name == "cw":
            if eps is not None:
                raise ValueError("attack=cw finds a minimal L2 perturbation and has no attack.eps; tune attack.c")
            return None
        if eps is None:
            raise ValueError(f"attack={self.name} needs attack.eps (the perturbation radius in [0,1] pixel units)")
        eps = validators.number("attack.eps", eps, 0.0)
        if self.norm == "Linf" and eps > 1:
            raise ValueError(
                f"attack.eps={eps} is an L-inf radius in [0,1] pixel units and must lie in [0, 1] "
                f"(1 already allows any image; 1/255 ~ 0.004 is one grey level)"
            )
        return eps

    def check_eps_fits(self, images: Tensor) -> None:
        """An L2 radius can be at most the L2 norm of an all-ones image, sqrt(C*H*W): no image
        in [0, 1] is farther from another."""
        if self.eps is None or self.norm != "L2":
            return
        bound = math.sqrt(images[0].numel())
        if self.eps > bound:
            shape = "x".join(str(d) for d in images.shape[1:])
            raise ValueError(
                f"attack.eps={self.eps} is an L2 radius larger than the L2 norm of an all-ones {shape} image "
                f"({bound:.4g}), the largest distance between two images in [0, 1]; expected attack.eps in [0, {bound:.4g}]"
            )

    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """The torchattacks arguments, checked: known names, counts whole and >= 1, step sizes
        finite and > 0, shares in their range, so no setting makes an attack loop for ever
        or stand still."""
        cls = ATTACKS[self.name]
        signature = inspect.signature(cls.__init__).parameters
        allowed = [p for p in signature if p not in ("self", "model", "eps", "norm")]
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ValueError(f"attack={self.name} has no parameter {', '.join(unknown)}; its parameters: {', '.join(allowed)}")
        params = dict(params)
        for key in ("steps", "n_queries", "n_restarts", "eot_iter"):
            if key in params:
                params[key] = _count(key, params[key])
        if "steps" in signature and "steps" not in params:
            # torchattacks' default, explicit: its BIM reads steps=0 as min(255 eps + 4, 1.25 * 255 eps)
            params["steps"] = signature["steps"].default
        for key in ("alpha", "lr", "c"):
            if params.get(key) is not None:
                params[key] = _number(key, params[key])
                if not (math.isfinite(params[key]) and params[key] > 0):
                    raise ValueError(f"attack.{key} must be a finite number > 0, got {params[key]}")
        if "alpha" in params and params["alpha"] is None:
            params["alpha"] = STEP_SIZE_FACTOR * self.eps / params["steps"]
        if "kappa" in params:
            params["kappa"] = _number("kappa", params["kappa"])
            if not (math.isfinite(params["kappa"]) and params["kappa"] >= 0):
                raise ValueError(f"attack.kappa (CW's confidence margin) must be a finite number >= 0, got {params['kappa']}")
        for key, low, high, what in (
            ("p_init", 0.0, 1.0, "Square's initial share of the image a square covers"),
            ("rho", 0.0, 1.0, "APGD's step-size halving threshold"),
        ):
            if key in params:
                params[key] = _number(key, params[key])
                if not low < params[key] <= high:
                    raise ValueError(f"attack.{key} ({what}) must lie in ({low:g}, {high:g}], got {params[key]}")
        if self.name == "apgd" and params.get("loss", "ce") != "ce":
            raise ValueError(
                f"attack.loss={params['loss']!r}: APGD-DLR needs at least 3 classes and an attacked "
                "finding has 2 (absent/present); use attack.loss=ce"
            )
        if self.name == "square" and params.get("loss", "margin") not in ("margin", "ce"):
            raise ValueError(f"attack.loss={params['loss']!r}: expected 'margin' or 'ce'")
        return params

    def finding_index(self, findings: Sequence[str]) -> int | None:
        """The attacked finding's index for a named target, None for ``top``/``top_absent``/``all``;
        raises if the name is not one of ``findings``."""
        if self.target in (*PER_IMAGE_TARGETS, "all"):
            return None
        if self.target not in findings:
            raise ValueError(
                f"attack.target={self.target!r} is not a finding of this classifier; expected {TARGETS_HELP}: "
                f"{', '.join(findings)}"
            )
        return list(findings).index(self.target)

    def image_findings(self, clean_logits: Tensor) -> Tensor:
        """The finding attacked on each image [N] for ``top`` (the most likely one) and
        ``top_absent`` (the most likely among those predicted absent; an image that predicts
        every finding present falls back to ``top``). NaN logits (missing findings) never win."""
        scores = clean_logits.masked_fill(torch.isnan(clean_logits), float("-inf"))
        if self.target == "top_absent":
            absent = scores.masked_fill(scores > 0, float("-inf"))
            none_absent = torch.isinf(absent).all(dim=1, keepdim=True)
            scores = torch.where(none_absent, scores, absent)
        return scores.argmax(dim=1)

    # -- attacking ---------------------------------------------------------------
    def build(self, model: nn.Module) -> torchattacks.Attack:
        """The torchattacks object for a (wrapped) model."""
        kwargs = dict(self.params)
        if self.eps is not None:
            kwargs["eps"] = self.eps
        if self.name in ("apgd", "square"):
            kwargs["norm"] = self.norm
        return ATTACKS[self.name](model, **kwargs)

    def __call__(self, model: nn.Module, images: Tensor, labels: Tensor, findings: Sequence[str] | None = None) -> Adversarial:
        """Attack ``images`` [N, C, H, W] in [0, 1] with true ``labels`` [N, K] (0/1; NaN: unknown,
        then the model's prediction stands in).

        ``findings`` names the model's outputs (needed for a named target; defaults
        to ``model.findings``).
        """
        if images.min() < 0 or images.max() > 1:
            raise ValueError("attack inputs must lie in [0, 1] (the classifier normalises them itself)")
        self.check_eps_fits(images)
        labels = labels.float()
        # the attack sees the model in eval mode (BatchNorm statistics frozen, no dropout);
        # every submodule gets its own mode back, whatever torchattacks did in between
        with eval_mode(model):
            return self._attack(model, images, labels, findings)

    def _attack(self, model: nn.Module, images: Tensor, labels: Tensor, findings: Sequence[str] | None) -> Adversarial:
        with torch.no_grad():
            clean_logits = model(images)
        n, k = clean_logits.shape
        if labels.shape != (n, k):
            raise ValueError(f"labels must be [N, K] = {(n, k)}, got {tuple(labels.shape)}")
        # a label the data does not give (NaN: an output of the model's own label space that the
        # data set does not annotate) is the model's own clean prediction, as attacks without labels do
        labels = torch.where(torch.isnan(labels), (clean_logits > 0).to(labels.dtype), labels)
        names = findings if findings is not None else getattr(model, "findings", None)
        if names is None and self.target not in (*PER_IMAGE_TARGETS, "all"):
            raise ValueError(f"attack.target={self.target!r} needs the classifier's finding names (pass findings=)")
        fixed = None if names is None else self.finding_index(names)
        # findings the classifier does not predict come as NaN logits (a pretrained network
        # without them, e.g. XRVClassifier.missing_findings): never attack those
        missing = torch.isnan(clean_logits).any(dim=0)
        if missing.all():
            raise ValueError("the classifier's logits are NaN for every finding: there is nothing to attack")
        if fixed is not None and missing[fixed]:
            predicted = [str(name) for name, gone in zip(names, missing.tolist()) if not gone]
            raise ValueError(
                f"attack.target={self.target!r}: the classifier does not predict this finding (its logits are NaN); "
                f"expected one it predicts: {', '.join(predicted)}"
            )
        columns = torch.nonzero(~missing).flatten() if missing.any() else None
        if self.target == "all":
            groups = [(torch.arange(n, device=images.device), None)]
        elif self.target in PER_IMAGE_TARGETS:
            top = self.image_findings(clean_logits)
            groups = [(torch.nonzero(top == j).flatten(), j) for j in torch.unique(top).tolist()]
        else:
            groups = [(torch.arange(n, device=images.device), fixed)]
        targeted = self.mode == "targeted"
        goal = torch.full_like(labels, 1.0 if self.to == "present" else 0.0) if targeted else labels.clone()
        attacked = torch.zeros_like(labels, dtype=torch.bool)
        adv = images.clone()
        for idx, finding in groups:
            if finding is not None:
                attacked[idx, finding] = True
            elif columns is None:
                attacked[idx] = True
            else:
                attacked[idx[:, None], columns] = True
            adv[idx] = self._attack_group(model, images[idx], goal[idx], finding, targeted, columns)
        return Adversarial(images=adv.detach(), attacked=attacked, goal=goal, targeted=targeted)

    def _attack_group(
        self, model: nn.Module, images: Tensor, goal: Tensor, finding: int | None, targeted: bool,
        columns: Tensor | None = None,
    ) -> Tensor:
        if finding is None and columns is not None:  # target=all: only the findings the model predicts
            model, goal = _Columns(model, columns), goal[:, columns]
        atk = self.build(FindingLogits(model, finding))
        labels = (goal if finding is None else goal[:, finding]).long()
        if targeted and "targeted" in atk.supported_mode:
            atk.set_mode_targeted_by_label(quiet=True)
        elif targeted:
            # APGD has no targeted mode; with two classes, moving away from 1 - t is moving to t
            labels = 1 - labels
        # APGD and Square reseed torch's global generator: keep that inside the attack
        forked = contextlib.ExitStack()
        if self.name in ("apgd", "square"):
            forked.enter_context(torch.random.fork_rng(devices=[images.device] if images.is_cuda else []))
        with forked, torch.enable_grad():
            return atk(images, labels)

    def __repr__(self) -> str:
        extra = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return (
            f"MultiLabelAttack({self.name}, target={self.target!r}, mode={self.mode!r}, eps={self.eps}, "
            f"norm={self.norm}{', ' + extra if extra else ''})"
        )
