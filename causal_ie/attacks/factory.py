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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torchattacks
from torch import Tensor, nn

from causal_ie.attacks.wrapper import FindingLogits
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
TARGETS_HELP = "'top' (each image's most likely finding), 'all' (every finding) or a finding name"


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


class MultiLabelAttack:
    """A torchattacks attack against a multi-label classifier (``conf/attack/*.yaml``).

    Args:
        name: one of ``fgsm, bim, pgd, pgdl2, cw, apgd, square``.
        target: ``top`` attacks each image's most likely finding, ``all`` the whole
            label vector (BCE over all findings; FGSM/BIM/PGD/PGD-L2 only), a finding
            name that finding in every image.
        mode: ``untargeted`` pushes the attacked findings away from their true labels;
            ``targeted`` pushes them to ``to`` (``present`` or ``absent``).
        eps: radius of the perturbation ball in [0, 1] pixel units (L-inf or L2 as
            ``norm``); CW is unbounded and takes none.
        norm: ``Linf`` or ``L2`` for APGD and Square; the others have a fixed norm.
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
        **params: Any,
    ):
        self.name = str(name).lower()
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
        given = None if norm is None else {"linf": "Linf", "inf": "Linf", "l2": "L2"}.get(str(norm).lower())
        if norm is not None and given is None:
            raise ValueError(f"attack.norm={norm!r}: expected Linf or L2")
        if fixed is None:
            if given is None:
                raise ValueError(f"attack={self.name} needs attack.norm: Linf or L2")
            return given
        if given is not None and given != fixed:
            other = "pgdl2" if given == "L2" else "pgd"
            raise ValueError(f"attack={self.name} is an {fixed} attack, not {given}; use attack={other}")
        return fixed

    def _check_eps(self, eps: float | None) -> float | None:
        if self.name == "cw":
            if eps is not None:
                raise ValueError("attack=cw finds a minimal L2 perturbation and has no attack.eps; tune attack.c")
            return None
        if eps is None:
            raise ValueError(f"attack={self.name} needs attack.eps (the perturbation radius in [0,1] pixel units)")
        eps = float(eps)
        if not eps >= 0:
            raise ValueError(f"attack.eps must be >= 0, got {eps}")
        return eps

    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        cls = ATTACKS[self.name]
        allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "model", "eps", "norm")]
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ValueError(f"attack={self.name} has no parameter {', '.join(unknown)}; its parameters: {', '.join(allowed)}")
        params = dict(params)
        if "alpha" in params and params["alpha"] is None:
            steps = params.get("steps") or inspect.signature(cls.__init__).parameters["steps"].default
            params["alpha"] = STEP_SIZE_FACTOR * self.eps / max(int(steps), 1)
        if self.name == "apgd" and params.get("loss", "ce") != "ce":
            raise ValueError(
                f"attack.loss={params['loss']!r}: APGD-DLR needs at least 3 classes and an attacked "
                "finding has 2 (absent/present); use attack.loss=ce"
            )
        if self.name == "square" and params.get("loss", "margin") not in ("margin", "ce"):
            raise ValueError(f"attack.loss={params['loss']!r}: expected 'margin' or 'ce'")
        for key in ("steps", "n_queries", "n_restarts"):
            if key in params and int(params[key]) < 1:
                raise ValueError(f"attack.{key} must be >= 1, got {params[key]}")
        return params

    def finding_index(self, findings: Sequence[str]) -> int | None:
        """The attacked finding's index for a named target, None for ``top``/``all``;
        raises if the name is not one of ``findings``."""
        if self.target in ("top", "all"):
            return None
        if self.target not in findings:
            raise ValueError(
                f"attack.target={self.target!r} is not a finding of this classifier; expected {TARGETS_HELP}: "
                f"{', '.join(findings)}"
            )
        return list(findings).index(self.target)

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
        """Attack ``images`` [N, C, H, W] in [0, 1] with true ``labels`` [N, K] (0/1).

        ``findings`` names the model's outputs (needed for a named target; defaults
        to ``model.findings``).
        """
        if images.min() < 0 or images.max() > 1:
            raise ValueError("attack inputs must lie in [0, 1] (the classifier normalises them itself)")
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
        names = findings if findings is not None else getattr(model, "findings", None)
        if names is None and self.target not in ("top", "all"):
            raise ValueError(f"attack.target={self.target!r} needs the classifier's finding names (pass findings=)")
        fixed = None if names is None else self.finding_index(names)
        if self.target == "all":
            groups = [(torch.arange(n, device=images.device), None)]
        elif self.target == "top":
            top = clean_logits.argmax(dim=1)
            groups = [(torch.nonzero(top == j).flatten(), j) for j in torch.unique(top).tolist()]
        else:
            groups = [(torch.arange(n, device=images.device), fixed)]
        targeted = self.mode == "targeted"
        goal = torch.full_like(labels, 1.0 if self.to == "present" else 0.0) if targeted else labels.clone()
        attacked = torch.zeros_like(labels, dtype=torch.bool)
        adv = images.clone()
        for idx, finding in groups:
            attacked[idx, slice(None) if finding is None else finding] = True
            adv[idx] = self._attack_group(model, images[idx], goal[idx], finding, targeted)
        return Adversarial(images=adv.detach(), attacked=attacked, goal=goal, targeted=targeted)

    def _attack_group(self, model: nn.Module, images: Tensor, goal: Tensor, finding: int | None, targeted: bool) -> Tensor:
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
