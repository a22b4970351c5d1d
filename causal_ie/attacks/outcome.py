"""The attack and its per-image outcome: did it reach its goal, which finding it moved, how far."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from causal_ie.attacks.factory import Adversarial, MultiLabelAttack
from causal_ie.attacks.records import AttackRecords

# per image: could the attack change it, did it reach its goal, attacked predictions flipped,
# findings attacked, and the L-inf / L2 / L0 share of the change
OUTCOMES = ("eligible", "success", "flipped", "attacked", "linf", "l2", "l0")

__all__ = ["OUTCOMES", "attack_outcome", "attack_results", "changed_share", "focus_finding"]


def changed_share(adversarial: Tensor, clean: Tensor) -> Tensor:
    """Per image [B] (float64): the share of pixels the attack changed by more than 1e-6
    (the ``l0`` outcome; above 0: a ``changed`` pair)."""
    return ((adversarial - clean).flatten(1).abs() > 1e-6).double().mean(1)


def focus_finding(attacked: Tensor, probs: Tensor) -> Tensor:
    """The finding whose maps are compared: the attacked one, or (all findings attacked)
    the most likely one on the clean image (a missing finding's NaN never wins)."""
    single = attacked.sum(1) == 1
    return torch.where(single, attacked.float().argmax(1), probs.nan_to_num(float("-inf")).argmax(1))


def attack_outcome(adv: Adversarial, p_clean: Tensor, p_adv: Tensor, images: Tensor) -> dict[str, Tensor]:
    """:data:`OUTCOMES` per image [B] (float64)."""
    att = adv.attacked
    pred_clean, pred_adv = p_clean > 0.5, p_adv > 0.5
    goal = adv.goal > 0.5
    at_goal_clean = ((pred_clean == goal) | ~att).all(1)
    at_goal_adv = ((pred_adv == goal) | ~att).all(1)
    if adv.targeted:
        eligible, success = ~at_goal_clean, at_goal_adv
    else:  # the goal is the true label: success = some attacked finding now wrong
        eligible, success = at_goal_clean, ~at_goal_adv
    delta = (adv.images - images).flatten(1)
    values = (
        eligible,
        success,
        ((pred_clean != pred_adv) & att).sum(1),
        att.sum(1),
        delta.abs().amax(1),
        delta.norm(dim=1),
        changed_share(adv.images, images),
    )
    return {name: v.double() for name, v in zip(OUTCOMES, values)}


def attack_results(
    attack: MultiLabelAttack, records: AttackRecords, findings: Sequence[str], auroc_mean: float,
    per_finding: Sequence[float],
) -> dict[str, Any]:
    """The ``attack`` section of results.json."""
    eligible = records.outcome("eligible") > 0
    attacked = records.outcome("attacked").sum()
    return {
        "name": attack.name,
        "target": attack.target,
        "mode": attack.mode if attack.mode == "untargeted" else f"targeted:{attack.to}",
        "eps": attack.eps,
        "norm": attack.norm,
        # among images the attack could change (untargeted: attacked findings right on
        # clean; targeted: not yet at the goal), the share where it reached its goal
        "success_rate": float(records.outcome("success")[eligible].mean()) if eligible.any() else float("nan"),
        "eligible_images": int(eligible.sum()),
        "num_images": len(records),
        # share of attacked (image, finding) predictions that changed at threshold 0.5
        "flip_rate": float(records.outcome("flipped").sum() / max(attacked, 1)),
        "auroc_mean": auroc_mean,
        "auroc": dict(zip(findings, per_finding)),
        "perturbation": {k: float(np.mean(records.outcome(k))) for k in ("linf", "l2", "l0")},
    }
