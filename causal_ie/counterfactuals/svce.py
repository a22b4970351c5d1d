"""Sparse visual counterfactual explanations (SVCE) of one finding of a multi-label classifier.

Boreiko et al. 2022, "Sparse Visual Counterfactual Explanations in Image
Space": for an image x and finding k, the counterfactual is

    z* = argmax_{z in [0,1]^d, ||z - x||_p <= eps}  log y_k(z)        ("add")
    z* = argmax_{z in [0,1]^d, ||z - x||_p <= eps}  log (1 - y_k(z))  ("remove")

with y = sigmoid(f(z)) and p = 1.5 by default (sparser than l2, less
scattered than l1), solved with Auto-Frank-Wolfe. The baseline is APGD-L2
(Croce & Hein 2020) from torchattacks on a two-class view of finding k.

A counterfactual is judged by the confidence it reaches, by how sparse the
change ``z - x`` is (l0, l1, l1.5, l2) and by where its mass lies: inside the
lesion box (the change is about the finding) or on a planted shortcut marker
(the classifier relies on the spurious feature).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from numbers import Integral

import torch
import torch.nn.functional as F
import torchattacks
from torch import Tensor, nn

from causal_ie.attacks.wrapper import FindingLogits
from causal_ie.counterfactuals.afw import auto_frank_wolfe, frank_wolfe
from causal_ie.counterfactuals.lmo import check_p, lp_norm
from causal_ie.data.findings import FINDINGS  # the names of a model that declares none
from causal_ie.explain.metrics import box_masks
from causal_ie.precision import full_precision
from causal_ie.runtime import eval_mode, model_device, to_model

__all__ = [
    "CHANGED",
    "DIRECTIONS",
    "SVCE",
    "APGDCounterfactual",
    "CounterfactualGenerator",
    "CounterfactualResult",
    "FindingLogits",
    "FindingObjective",
    "counterfactual_metrics",
    "finding_indices",
]

DIRECTIONS = ("add", "remove")
CHANGED = 1e-3
"""A coordinate counts as changed (for l0) when ``|z - x|`` exceeds this."""


def finding_indices(
    finding: str | int | Sequence[str | int] | Tensor, batch: int, findings: Sequence[str] = FINDINGS
) -> Tensor:
    """Finding names or indices (one, or one per image) -> a long tensor ``[batch]``.

    Raises ValueError naming the bad value and listing the valid names.
    """
    if isinstance(finding, Tensor):
        items = finding.reshape(-1).tolist()
    elif isinstance(finding, str | Integral):
        items = [finding]
    else:
        items = list(finding)
    names = list(findings)
    out = []
    for item in items:
        if isinstance(item, str):
            if item not in names:
                raise ValueError(f"finding={item!r} is unknown; expected one of {', '.join(names)} (or an index)")
            out.append(names.index(item))
        elif isinstance(item, Integral) and 0 <= int(item) < len(names):
            out.append(int(item))
        else:
            raise ValueError(f"finding={item!r}: expected an index in [0, {len(names)}) or one of {', '.join(names)}")
    if len(out) == 1:
        out = out * batch
    if len(out) != batch:
        raise ValueError(f"finding: expected one finding or one per image ({batch}), got {len(out)}")
    return torch.tensor(out, dtype=torch.long)


def _directions(direction: str | Sequence[str], batch: int) -> Tensor:
    """'add'/'remove' (one, or one per image) -> a bool tensor ``[batch]``, True for 'add'."""
    items = [direction] if isinstance(direction, str) else list(direction)
    for d in items:
        if d not in DIRECTIONS:
            raise ValueError(f"direction={d!r}; expected one of {DIRECTIONS}")
    if len(items) == 1:
        items = items * batch
    if len(items) != batch:
        raise ValueError(f"direction: expected one value or one per image ({batch}), got {len(items)}")
    return torch.tensor([d == "add" for d in items], dtype=torch.bool)


def _check_eps(eps: float) -> float:
    eps = float(eps)
    if math.isnan(eps) or eps <= 0:
        raise ValueError(f"eps must be > 0 (the radius of the lp ball around the image), got eps={eps}")
    return eps


class FindingObjective:
    """``z -> log y_k(z)`` ("add") or ``log(1 - y_k(z)) = log sigmoid(-z_k)`` ("remove"), one k per image."""

    def __init__(self, model: nn.Module, finding: Tensor, add: Tensor):
        self.model, self.finding, self.add = model, finding, add

    def __call__(self, z: Tensor) -> Tensor:
        logit = self.model(z).gather(1, self.finding[:, None])[:, 0]
        # in z's dtype: under autocast the logit comes in bfloat16, its log-sigmoid need not
        logit = logit.to(z.dtype)
        return F.logsigmoid(torch.where(self.add, logit, -logit))


@dataclass
class CounterfactualResult:
    """Counterfactuals of a batch: the images, their targets and the measures of the change (all on CPU)."""

    method: str
    x: Tensor
    z: Tensor
    finding: Tensor
    add: Tensor
    confidence_before: Tensor
    confidence_after: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)

    @property
    def directions(self) -> list[str]:
        return ["add" if a else "remove" for a in self.add.tolist()]


def _mass_share(change: Tensor, boxes: Tensor | None) -> Tensor:
    """Share of the absolute change inside each image's box [B,4]; NaN without a box or a change."""
    batch = change.shape[0]
    if boxes is None:
        return torch.full((batch,), math.nan)
    boxes = torch.as_tensor(boxes, dtype=torch.float64).reshape(batch, 4)
    mass = change.abs().sum(dim=1)  # over channels: [B,H,W]
    inside = (mass * box_masks(boxes, *mass.shape[-2:])).flatten(1).sum(1)
    total = mass.flatten(1).sum(1)
    valid = ~torch.isnan(boxes).any(dim=1) & (total > 0)
    return torch.where(valid, inside / total.clamp_min(1e-300), torch.full_like(total, math.nan)).float()


def counterfactual_metrics(
    x: Tensor, z: Tensor, boxes: Tensor | None = None, marker_boxes: Tensor | None = None, threshold: float = CHANGED
) -> dict[str, Tensor]:
    """Per-image measures of the change ``z - x`` (images [B,C,H,W]), each a tensor [B].

    ``l0``: coordinates whose absolute change exceeds ``threshold``;
    ``l1``, ``l1_5``, ``l2``: norms of the change; ``box_mass_share``: share
    of the absolute change (summed over channels) inside the lesion box
    ``boxes`` [B,4] (x, y, w, h pixels); ``marker_mass_share``: share on the
    shortcut marker's box ``marker_boxes`` [B,4]. Shares are NaN where the
    box is NaN or absent, or nothing changed.
    """
    if x.shape != z.shape or x.dim() != 4:
        raise ValueError(f"x and z must be image batches [B,C,H,W] of one shape, got {tuple(x.shape)} and {tuple(z.shape)}")
    change = z.detach().cpu().double() - x.detach().cpu().double()
    return {
        "l0": (change.abs() > threshold).flatten(1).sum(1).float(),
        "l1": lp_norm(change, 1.0).float(),
        "l1_5": lp_norm(change, 1.5).float(),
        "l2": lp_norm(change, 2.0).float(),
        "box_mass_share": _mass_share(change, boxes),
        "marker_mass_share": _mass_share(change, marker_boxes),
    }


@contextlib.contextmanager
def _image_gradients_only(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and frozen weights for the duration: gradients flow to the image only."""
    trainable = [q for q in model.parameters() if q.requires_grad]
    with eval_mode(model):
        for q in trainable:
            q.requires_grad_(False)
        try:
            yield model
        finally:
            for q in trainable:
                q.requires_grad_(True)


class CounterfactualGenerator:
    """Shared driver: targets, batching, confidences and measures around one optimiser.

    Subclasses implement :meth:`optimise` for one batch on the model's device (in its dtype).
    The optimisation runs under whatever autocast the caller set (a search may run in
    bfloat16); the confidences before and after are measured with autocast off
    (:func:`causal_ie.precision.full_precision`). Results come back on the CPU, ``z`` in
    the dtype of ``x``.
    """

    name = "counterfactual"

    def __init__(self, eps: float, p: float, steps: int, batch_size: int = 32, name: str | None = None):
        self.eps = _check_eps(eps)
        self.p = check_p(p)
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1 (forward+backward passes per image), got {steps}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.steps, self.batch_size = int(steps), int(batch_size)
        if name is not None:
            self.name = str(name)

    def optimise(self, model: nn.Module, x: Tensor, finding: Tensor, add: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        finding: str | int | Sequence[str | int] | Tensor,
        direction: str | Sequence[str] = "add",
        boxes: Tensor | None = None,
        marker_boxes: Tensor | None = None,
        findings: Sequence[str] | None = None,
    ) -> CounterfactualResult:
        """Counterfactuals of images ``x`` [B,C,H,W] in [0,1], one target finding per image.

        Args:
            model: images in [0,1] -> finding logits [B, K]; run in eval mode.
            finding: a name of ``findings`` (default: the model's ``findings``
                or NIH's 14 FINDINGS for a model that declares none), an index, or one per image.
            direction: ``add`` (raise y_k) or ``remove`` (lower it), or one per image.
            boxes: lesion boxes [B,4] for ``box_mass_share`` (NaN: none).
            marker_boxes: shortcut-marker boxes [B,4] for ``marker_mass_share`` (NaN: none).
        """
        if x.dim() != 4:
            raise ValueError(f"x must be a batch of images [B,C,H,W], got shape {tuple(x.shape)}")
        batch = x.shape[0]
        names = findings if findings is not None else getattr(model, "findings", FINDINGS)
        k = finding_indices(finding, batch, names)
        add = _directions(direction, batch)
        device = model_device(model, x.device)
        z_parts, before, after = [], [], []
        with _image_gradients_only(model):
            for start in range(0, batch, self.batch_size):
                part = slice(start, start + self.batch_size)
                xb, kb, ab = to_model(model, x[part].detach()), k[part].to(device), add[part].to(device)
                zb = self.optimise(model, xb, kb, ab).detach()
                with torch.no_grad(), full_precision(device):
                    before.append(torch.sigmoid(model(xb).gather(1, kb[:, None])[:, 0]).float().cpu())
                    after.append(torch.sigmoid(model(zb).gather(1, kb[:, None])[:, 0]).float().cpu())
                z_parts.append(zb.to("cpu", x.dtype))
        z = torch.cat(z_parts)
        return CounterfactualResult(
            method=self.name,
            x=x.detach().cpu(),
            z=z,
            finding=k,
            add=add,
            confidence_before=torch.cat(before),
            confidence_after=torch.cat(after),
            metrics=counterfactual_metrics(x, z, boxes, marker_boxes),
        )


class SVCE(CounterfactualGenerator):
    """Sparse visual counterfactuals by Auto-Frank-Wolfe in the lp ball ∩ [0,1]^d.

    Args:
        eps: radius of the lp ball around the image (pixel values in [0,1]).
        p: the norm (1.5: the paper's choice; 1 and 2 for comparison).
        steps: forward+backward passes per image.
        step_size, momentum: initial step and gradient momentum of AFW.
        optimizer: ``afw`` (Auto-Frank-Wolfe) or ``fw`` (plain Frank-Wolfe, 2/(t+2)).
        batch_size: images optimised together.
        name: the method's name in results (``svce``, ``l2``, ...).
    """

    name = "svce"

    def __init__(
        self,
        eps: float = 6.0,
        p: float = 1.5,
        steps: int = 100,
        step_size: float = 0.75,
        momentum: float = 0.5,
        optimizer: str = "afw",
        batch_size: int = 32,
        name: str | None = None,
    ):
        super().__init__(eps, p, steps, batch_size, name)
        if optimizer not in ("afw", "fw"):
            raise ValueError(f"optimizer={optimizer!r}; expected 'afw' or 'fw'")
        self.step_size, self.momentum, self.optimizer = float(step_size), float(momentum), optimizer

    def optimise(self, model: nn.Module, x: Tensor, finding: Tensor, add: Tensor) -> Tensor:
        objective = FindingObjective(model, finding, add)
        if self.optimizer == "fw":
            return frank_wolfe(objective, x, self.eps, self.p, self.steps).x
        return auto_frank_wolfe(
            objective, x, self.eps, self.p, self.steps, step_size=self.step_size, momentum=self.momentum
        ).x


class APGDCounterfactual(CounterfactualGenerator):
    """Baseline: APGD-L2 (torchattacks) on the two-class view :class:`FindingLogits` of the finding.

    Label 0 for ``add`` and 1 for ``remove`` (see :class:`FindingLogits`).
    The point of highest loss is returned (``best_loss=True``), i.e. the most
    confident counterfactual, not merely the first that crosses 0.5. The
    random start is drawn from ``seed``, leaving the global RNG untouched.

    Args:
        eps: l2 radius (use SVCE's l2 eps to compare at equal budget).
        steps: forward+backward passes per image, as for :class:`SVCE`:
            torchattacks makes one at its start point and ``steps - 1`` iterations.
    """

    name = "apgd"

    def __init__(self, eps: float = 2.0, steps: int = 100, seed: int = 0, batch_size: int = 32, name: str | None = None):
        super().__init__(eps, 2.0, steps, batch_size, name)
        if self.steps < 2:
            raise ValueError(f"steps must be >= 2 for APGD (a start and one iteration), got {steps}")
        self.seed = int(seed)

    def optimise(self, model: nn.Module, x: Tensor, finding: Tensor, add: Tensor) -> Tensor:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints when the model has no parameters
            attack = torchattacks.APGD(
                FindingLogits(model, finding), norm="L2", eps=self.eps, steps=self.steps - 1, n_restarts=1, loss="ce"
            )
        attack.set_device(x.device)
        labels = (~add).long()
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            with torch.enable_grad():
                _, z = attack.perturb(x, labels, best_loss=True)
        return z.detach()
