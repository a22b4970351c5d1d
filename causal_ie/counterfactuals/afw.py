"""Auto-Frank-Wolfe: a projection-free optimiser over the lp ball ∩ [0,1]^d with adaptive steps.

Boreiko et al. 2022 ("Sparse Visual Counterfactual Explanations in Image
Space", Sec. 3.2) solve

    max_{z in [0,1]^d, ||z - x||_p <= eps} f(z)

with Frank-Wolfe iterations ``z <- z + gamma (v - z)``, where ``v`` is the
vertex of the linear minimisation oracle (:func:`lp_ball_box_lmo`) for a
momentum average of the gradients. Every iterate is a convex combination of
feasible points, hence feasible: no projection onto the awkward set
"lp ball ∩ box" is ever needed. The classic step ``2/(t+2)`` is made for
convex problems and wastes a small budget on a non-convex network; instead,
as in APGD (Croce & Hein 2020, Sec. 3.2), the budget is split at checkpoints
(22%, 41%, 57%, 70%, ... of the passes). At a checkpoint an image whose
objective rose in fewer than ``rho`` of the passes since the last one, or
whose best value did not improve although its step was not cut last time,
halves its step, restarts from its best point and drops its momentum.
All bookkeeping is per image, so one batch can hold different images,
targets and radii.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from causal_ie.counterfactuals.lmo import check_eps, check_p, lp_ball_box_lmo, lp_norm

__all__ = ["AFWResult", "auto_frank_wolfe", "checkpoint_schedule", "frank_wolfe"]

Objective = Callable[[Tensor], Tensor]
"""Maps a batch ``z`` [B, ...] to one differentiable objective value per image, shape [B]."""


@dataclass
class AFWResult:
    """What a Frank-Wolfe run found, per image.

    Attributes:
        x: the best point found (shape of the input).
        value: the objective at ``x``, [B].
        history: best value after each pass, [steps, B] (monotone).
        values: objective of the iterate at each pass, [steps, B].
        step_size: final step size per image, [B].
        restarts: how many times each image restarted from its best point, [B].
    """

    x: Tensor
    value: Tensor
    history: Tensor
    values: Tensor
    step_size: Tensor
    restarts: Tensor


def checkpoint_schedule(steps: int) -> list[int]:
    """APGD's checkpoints as pass indices: 0.22, 0.41, 0.57, 0.70, ... of ``steps``.

    ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` (Croce & Hein 2020, Sec. 3.2).
    """
    fractions, prev, cur = [], 0.0, 0.22
    while cur < 1.0:
        fractions.append(cur)
        prev, cur = cur, cur + max(cur - prev - 0.03, 0.06)
    marks = sorted({int(round(f * steps)) for f in fractions})
    return [m for m in marks if 0 < m < steps]


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    """A per-image vector [B] shaped to broadcast against ``like`` [B, ...]."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


class _Search:
    """Evaluation in the caller's sign, and the best point per image seen so far."""

    def __init__(self, objective: Objective, x: Tensor, steps: int, maximize: bool):
        self.objective, self.sign = objective, 1.0 if maximize else -1.0
        batch = x.shape[0]
        self.values = torch.empty(steps, batch, dtype=x.dtype, device=x.device)
        self.history = torch.empty_like(self.values)
        self.best_x = x.clone()
        self.best_val = torch.full((batch,), -torch.inf, dtype=x.dtype, device=x.device)
        self.best_grad = torch.zeros_like(x)

    def evaluate(self, z: Tensor, i: int) -> tuple[Tensor, Tensor]:
        """Pass ``i``: one forward + backward; returns the value and gradient of the maximised objective."""
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            value = self.objective(z)
            if value.shape != (z.shape[0],):
                raise ValueError(f"the objective must return one value per image, shape [{z.shape[0]}], got {tuple(value.shape)}")
            (grad,) = torch.autograd.grad(value.sum(), z)
        value, grad = self.sign * value.detach().to(z.dtype), self.sign * grad.detach()
        better = value > self.best_val
        self.best_val = torch.where(better, value, self.best_val)
        self.best_x = torch.where(_rows(better, z), z.detach(), self.best_x)
        self.best_grad = torch.where(_rows(better, z), grad, self.best_grad)
        self.values[i], self.history[i] = value, self.best_val
        return value, grad

    def result(self, step_size: Tensor, restarts: Tensor) -> AFWResult:
        return AFWResult(
            x=self.best_x.clamp(0.0, 1.0),
            value=self.sign * self.best_val,
            history=self.sign * self.history,
            values=self.sign * self.values,
            step_size=step_size,
            restarts=restarts,
        )


def _validate(x: Tensor, eps: float | Tensor, p: float, steps: int, x_init: Tensor | None = None) -> tuple[Tensor, float, Tensor]:
    """Checked (eps [B] in x's dtype, p, start point)."""
    p = check_p(p)
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1 (forward+backward passes), got {steps}")
    if x.dim() < 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point batch [B, ...], got {x.dtype} of shape {tuple(x.shape)}")
    eps_t = check_eps(eps, x.shape[0], x.device)
    if x.min() < 0 or x.max() > 1:
        raise ValueError(f"x must lie in the box [0,1], got values in [{x.min().item():.4g}, {x.max().item():.4g}]")
    if x_init is None:
        return eps_t.to(x.dtype), p, x.detach().clone()
    if x_init.shape != x.shape:
        raise ValueError(f"x_init must have the shape of x {tuple(x.shape)}, got {tuple(x_init.shape)}")
    outside = (lp_norm((x_init - x).double(), p) > eps_t * (1 + 1e-5) + 1e-9).any()
    if outside or x_init.min() < 0 or x_init.max() > 1:
        raise ValueError("x_init must be feasible: inside [0,1] and within eps of x in the lp norm")
    return eps_t.to(x.dtype), p, x_init.detach().clone()


def _unit(g: Tensor) -> Tensor:
    """Per-image l2-normalised gradient: the LMO ignores scale, the momentum average must not."""
    norm = g.reshape(g.shape[0], -1).norm(dim=1).clamp_min(1e-30)
    return g / _rows(norm, g)


def auto_frank_wolfe(
    objective: Objective,
    x: Tensor,
    eps: float | Tensor,
    p: float = 1.5,
    steps: int = 100,
    *,
    maximize: bool = True,
    step_size: float = 0.75,
    momentum: float = 0.5,
    rho: float = 0.75,
    x_init: Tensor | None = None,
) -> AFWResult:
    """Maximise (or minimise) ``objective`` over ``{z in [0,1]^d : ||z - x||_p <= eps}``.

    Args:
        objective: ``z [B, ...] -> [B]``, differentiable; one value per image.
        x: centres of the balls, [B, ...] in [0,1].
        eps: radius, a float or one per image ([B]).
        p: the norm (1 <= p <= inf).
        steps: budget in forward+backward passes of ``objective`` (exactly
            this many are made).
        maximize: maximise (default) or minimise.
        step_size: the initial Frank-Wolfe step ``gamma`` in (0, 1]
            (0.75 as in the paper's code).
        momentum: weight of the previous direction in the running average of
            normalised gradients that the LMO sees (0: plain gradients).
        rho: at a checkpoint, an image halves its step unless its objective
            rose in at least this share of the passes since the last one.
        x_init: a feasible starting point (default: ``x``).

    Returns:
        :class:`AFWResult` with the best point per image. Deterministic for a
        deterministic objective.
    """
    eps_t, p, z = _validate(x, eps, p, steps, x_init)
    if not 0.0 < step_size <= 1.0:
        raise ValueError(f"step_size must be in (0, 1], got {step_size}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    x = x.detach()
    batch = x.shape[0]
    search = _Search(objective, x, steps, maximize)
    gamma = torch.full((batch,), float(step_size), dtype=x.dtype, device=x.device)
    restarts = torch.zeros(batch, dtype=torch.long, device=x.device)
    marks = set(checkpoint_schedule(steps))
    direction = torch.zeros_like(x)
    prev_val = torch.full((batch,), torch.inf, dtype=x.dtype, device=x.device)
    rises = torch.zeros(batch, dtype=torch.long, device=x.device)
    last_mark = 0
    best_at_mark = torch.full_like(prev_val, -torch.inf)
    cut_at_mark = torch.ones(batch, dtype=torch.bool, device=x.device)  # no "no progress" test at the first mark

    for i in range(steps):
        val, grad = search.evaluate(z, i)
        rises += (val > prev_val).long()
        prev_val = val
        if i == steps - 1:
            break
        fresh = torch.full((batch,), i == 0, dtype=torch.bool, device=x.device)
        if i in marks:
            stalled = rises < rho * (i - last_mark)
            no_progress = ~cut_at_mark & (search.best_val <= best_at_mark)
            cut = stalled | no_progress
            gamma = torch.where(cut, gamma / 2, gamma)
            restarts += cut.long()
            z = torch.where(_rows(cut, z), search.best_x, z)
            grad = torch.where(_rows(cut, z), search.best_grad, grad)
            prev_val = torch.where(cut, search.best_val, prev_val)
            fresh |= cut
            cut_at_mark, best_at_mark = cut, search.best_val.clone()
            rises.zero_()
            last_mark = i
        unit = _unit(grad)
        direction = torch.where(_rows(fresh, z), unit, (1 - momentum) * unit + momentum * direction)
        # the LMO minimises: maximise <direction, z> by minimising <-direction, z>
        vertex = lp_ball_box_lmo(-direction, x, eps_t, p)
        # no direction at all (a flat objective): stay rather than drift to x
        moving = direction.reshape(batch, -1).abs().amax(dim=1) > 0
        z = z + _rows(gamma * moving, z) * (vertex - z)

    return search.result(gamma, restarts)


def frank_wolfe(
    objective: Objective,
    x: Tensor,
    eps: float | Tensor,
    p: float = 1.5,
    steps: int = 100,
    *,
    maximize: bool = True,
    x_init: Tensor | None = None,
) -> AFWResult:
    """Plain Frank-Wolfe with the classic step ``gamma_t = 2/(t+2)``: the baseline of AFW.

    Same interface, budget and best-point bookkeeping as :func:`auto_frank_wolfe`.
    """
    eps_t, p, z = _validate(x, eps, p, steps, x_init)
    x = x.detach()
    batch = x.shape[0]
    search = _Search(objective, x, steps, maximize)
    for t in range(steps):
        _, grad = search.evaluate(z, t)
        if t == steps - 1:
            break
        vertex = lp_ball_box_lmo(-grad, x, eps_t, p)
        z = z + 2.0 / (t + 2.0) * (vertex - z)
    last = torch.full((batch,), 2.0 / (steps + 1.0), dtype=x.dtype, device=x.device)
    return search.result(last, torch.zeros(batch, dtype=torch.long, device=x.device))
