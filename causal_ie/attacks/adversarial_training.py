"""Adversarial training (Madry et al. 2018): the attack a Classifier trains against, and how often.

``model.adv_train`` in conf/model/_classifier.yaml builds one :class:`AdversarialTraining`, and
the Classifier takes the object: the models package needs no attack code of its own.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from causal_ie import validators
from causal_ie.attacks.factory import ATTACKS, LOSS_ONLY, MultiLabelAttack

class AdversarialTraining:
    """The untargeted all-findings attack a Classifier trains against, and the share of training
    batches it replaces (``ratio``). ``attack=None``: standard training.

    Only the attacks whose loss is plain cross-entropy can push the whole label vector at once
    (``target=all``); the others would attack one finding per image. ``settings`` holds the
    validated settings as plain Python types, for the checkpoint's hyper-parameters (which
    ``Classifier.load`` reads with ``weights_only=True``).
    """

    def __init__(
        self, attack: str | None = None, eps: float = 0.004, steps: int = 5, alpha: float | None = None,
        ratio: float = 0.5,
    ):
        self.settings: dict[str, Any] = {
            "attack": None if attack is None else str(attack).lower(),
            "eps": validators.number("model.adv_train.eps", eps, 0.0),
            "steps": validators.count("model.adv_train.steps", steps),
            "alpha": None if alpha is None else validators.number("model.adv_train.alpha", alpha, 0.0, low_open=True),
            # the share of training batches replaced by their adversarial version
            "ratio": validators.share("model.adv_train.ratio", ratio),
        }
        self.attack = self._attack()

    @property
    def ratio(self) -> float:
        return self.settings["ratio"]

    def _attack(self) -> MultiLabelAttack | None:
        name = self.settings["attack"]
        if name is None:
            return None
        if name not in LOSS_ONLY:
            problem = "cannot attack all findings at once" if name in ATTACKS else "is not known"
            raise ValueError(
                f"model.adv_train.attack={name!r} {problem}; adversarial training needs one of {', '.join(LOSS_ONLY)}"
            )
        params: dict[str, Any] = {}
        if name == "fgsm":  # one step of size eps: steps and alpha do not apply
            if self.settings["alpha"] is not None:
                raise ValueError("model.adv_train.alpha: fgsm takes a single step of size eps; set alpha to null")
        else:
            params = {"steps": self.settings["steps"], "alpha": self.settings["alpha"]}
        try:
            return MultiLabelAttack(name, target="all", mode="untargeted", eps=self.settings["eps"], **params)
        except ValueError as err:
            raise ValueError(f"model.adv_train: {err}") from err

    def is_adversarial_batch(self, batch_idx: int) -> bool:
        """Whether training batch ``batch_idx`` is replaced by its adversarial version.

        A fixed schedule rather than a coin flip: batch i is adversarial when
        ``floor((i + 1) * ratio) > floor(i * ratio)``, so each epoch's first n
        batches hold floor(n * ratio) adversarial ones (ratio 0.5: every second
        batch), the same in every run and after resuming mid-epoch, and no random
        state has to be checkpointed.
        """
        if self.attack is None:
            return False
        return math.floor((batch_idx + 1) * self.ratio) > math.floor(batch_idx * self.ratio)

    def __call__(self, model: nn.Module, images: Tensor, labels: Tensor, findings: tuple[str, ...]) -> Tensor:
        """The attack's images against ``model``'s current weights."""
        if self.attack is None:
            raise RuntimeError("adversarial images need model.adv_train.attack (adversarial training is off)")
        return self.attack(model, images.detach(), labels.detach(), findings=findings).images
