"""Linear minimisation oracle (LMO) over the intersection of an lp ball and the box [0,1]^d.

Frank-Wolfe methods (Auto-Frank-Wolfe, Boreiko et al. 2022, "Sparse Visual
Counterfactual Explanations in Image Space") never project: each iteration
only needs a vertex

    v = argmin_{z in [0,1]^d, ||z - x||_p <= eps} <g, z>

of the feasible set. Write z = x + delta. Every coordinate moves against its
gradient, ``delta_i = -sign(g_i) a_i`` with a magnitude ``0 <= a_i <= b_i``,
where ``b_i = 1 - x_i`` if ``g_i < 0`` and ``b_i = x_i`` if ``g_i > 0`` is the
room the box leaves in that direction. The problem becomes

    max_a  sum_i |g_i| a_i   s.t.  sum_i a_i^p <= eps^p,  0 <= a_i <= b_i,

solved in closed form per norm:

* ``p = inf``: ``a_i = min(b_i, eps)`` (the ball and the box are both boxes).
* ``p = 1``: a fractional knapsack in which every coordinate costs the same
  budget per unit: fill coordinates in order of decreasing ``|g_i|`` up to
  their room ``b_i`` until eps is spent.
* ``1 < p < inf``: the KKT conditions give ``a_i = min(b_i, t c_i)`` with
  ``c_i = |g_i|^(1/(p-1))`` and a scale ``t >= 0`` (``t ~ lambda^(-1/(p-1))``
  for the multiplier lambda of the norm constraint) such that
  ``sum_i a_i^p = eps^p`` unless the whole box corner fits in the ball.
  ``S(t) = sum_i min(b_i, t c_i)^p`` is increasing and of the form
  ``B + t^p C`` between its breakpoints ``t_i = b_i / c_i``, where
  coordinate i reaches the box. Sorting the breakpoints finds the segment
  that holds the solution, and that segment is solved exactly:
  O(d log d) per image.

``eps = 0`` is the trivial ball ``{x}`` and returns ``x``; ``eps < 0`` is an error.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["lp_ball_box_lmo", "lp_norm"]


def lp_norm(v: Tensor, p: float) -> Tensor:
    """Per-item lp norm of a batch ``[B, ...]`` -> ``[B]`` (p >= 1 or inf)."""
    flat = v.reshape(v.shape[0], -1)
    if math.isinf(p):
        return flat.abs().amax(dim=1) if flat.shape[1] else flat.new_zeros(flat.shape[0])
    return flat.abs().pow(p).sum(dim=1).pow(1.0 / p)


def check_p(p: float) -> float:
    """``p`` as a float; ValueError unless ``1 <= p <= inf``."""
    try:
        p = float(p)
    except (TypeError, ValueError):
        raise ValueError(f"p must be a number >= 1 (or inf), got p={p!r}") from None
    if math.isnan(p) or p < 1:
        raise ValueError(f"p must be >= 1 (or inf) for the lp ball, got p={p}")
    return p


def check_eps(eps: float | Tensor, batch: int, device: torch.device | None = None) -> Tensor:
    """``eps`` as a float64 tensor ``[batch]``; ValueError if negative, NaN or mis-shaped."""
    e = torch.as_tensor(eps, dtype=torch.float64, device=device)
    if e.dim() == 0:
        e = e.expand(batch)
    elif e.shape != (batch,):
        raise ValueError(f"eps must be a float or a tensor of shape [{batch}] (one per item), got shape {tuple(e.shape)}")
    if torch.isnan(e).any():
        raise ValueError(f"eps must not be NaN, got eps={eps}")
    if (e < 0).any():
        raise ValueError(f"eps must be >= 0 (the radius of the lp ball), got eps={eps}")
    return e


def lp_ball_box_lmo(grad: Tensor, x: Tensor, eps: float | Tensor, p: float = 1.5) -> Tensor:
    """The Frank-Wolfe vertex ``argmin_{z in [0,1]^d, ||z - x||_p <= eps} <grad, z>``, per item.

    Args:
        grad: the linear objective, shape ``[B, ...]``.
        x: the centre of the ball, same shape, inside ``[0,1]`` (values within
            1e-6 outside are clamped in).
        eps: radius >= 0: a float or a tensor ``[B]`` (one per item); ``inf`` allowed.
        p: the norm, ``1 <= p <= inf`` (``float("inf")`` for the max norm).

    Returns:
        ``z`` with the shape and dtype of ``x``. It is computed in float64 and
        rounded towards ``x``, so it is feasible in the dtype of ``x`` as well.
        Coordinates with zero gradient stay at ``x`` (with an all-zero
        gradient every feasible point is optimal and ``x`` is returned).

    Raises:
        ValueError: ``p < 1``; ``eps`` negative, NaN or not one per item;
            ``grad`` and ``x`` of different shapes or without a batch
            dimension; non-finite ``grad``; ``x`` outside ``[0,1]``.
    """
    p = check_p(p)
    if grad.shape != x.shape:
        raise ValueError(f"grad and x must have the same shape, got grad {tuple(grad.shape)} and x {tuple(x.shape)}")
    if x.dim() < 1:
        raise ValueError("grad and x need a batch dimension: shape [B, ...]")
    batch = x.shape[0]
    eps64 = check_eps(eps, batch, x.device)
    if x.numel() == 0:
        return x.clone()
    if not torch.isfinite(grad).all():
        raise ValueError("grad must be finite (no NaN or inf)")
    if not torch.isfinite(x).all() or x.min() < -1e-6 or x.max() > 1 + 1e-6:
        raise ValueError(f"x must lie in the box [0,1], got values in [{x.min().item():.4g}, {x.max().item():.4g}]")

    x_box = x.detach().clamp(0.0, 1.0)
    g = grad.detach().reshape(batch, -1).to(torch.float64)
    x64 = x_box.reshape(batch, -1).to(torch.float64)
    room = torch.where(g < 0, 1.0 - x64, torch.where(g > 0, x64, torch.zeros_like(x64)))
    if math.isinf(p):
        a = torch.minimum(room, eps64[:, None])
    elif p == 1.0:
        a = _l1_magnitudes(g.abs(), room, eps64)
    else:
        a = _lp_magnitudes(g.abs(), room, eps64, p)
    z = x64 - torch.sign(g) * a
    return _round_towards(z, x_box, a).reshape(x.shape)


def _round_towards(z64: Tensor, x: Tensor, a: Tensor) -> Tensor:
    """``z64`` in the dtype of ``x``, stepping one ulp back where rounding moved it past ``|z - x| = a``."""
    z = z64.to(x.dtype)
    if x.dtype == torch.float64:
        return z
    x_flat = x.reshape(z.shape)
    overshot = (z.to(torch.float64) - x_flat.to(torch.float64)).abs() > a
    return torch.where(overshot, torch.nextafter(z, x_flat), z)


def _l1_magnitudes(absg: Tensor, room: Tensor, eps: Tensor) -> Tensor:
    """Fractional knapsack: fill the largest |g_i| first, up to ``room_i``, until eps is spent."""
    order = torch.argsort(absg, dim=1, descending=True, stable=True)
    room_sorted = torch.gather(room, 1, order)
    spent_before = torch.cumsum(room_sorted, dim=1) - room_sorted
    left = (eps[:, None] - spent_before).clamp_min(0.0)
    a_sorted = torch.minimum(room_sorted, left)
    return torch.zeros_like(room).scatter(1, order, a_sorted)


def _suffix_sum(v: Tensor) -> Tensor:
    """``out[:, k] = sum_{j > k} v[:, j]``, summed from the small end (no cancellation)."""
    tail = torch.flip(torch.cumsum(torch.flip(v, dims=[1]), dim=1), dims=[1])
    return torch.cat([tail[:, 1:], torch.zeros_like(tail[:, :1])], dim=1)


def _lp_magnitudes(absg: Tensor, room: Tensor, eps: Tensor, p: float) -> Tensor:
    """KKT solution ``a_i = min(room_i, t c_i)`` for 1 < p < inf, with t from the sorted breakpoints."""
    if not 1.0 < p < math.inf:
        raise ValueError(f"the KKT solution needs 1 < p < inf, got p={p} (p=1 and p=inf have their own)")
    # The argmin does not change when g is scaled: normalise per item so that
    # c = |g|^(1/(p-1)) neither overflows nor underflows for the largest entries.
    gmax = absg.amax(dim=1, keepdim=True)
    gn = absg / torch.where(gmax > 0, gmax, torch.ones_like(gmax))
    c = gn.pow(1.0 / (p - 1.0))
    active = (c > 0) & (room > 0)  # an underflowed c_i contributes nothing
    c = torch.where(active, c, torch.zeros_like(c))
    # breakpoint t_i = room_i / c_i where coordinate i reaches the box; inactive: inf (never)
    brk = torch.where(active, room / torch.where(active, c, torch.ones_like(c)), torch.full_like(c, math.inf))
    order = torch.argsort(brk, dim=1, stable=True)
    brk_s = torch.gather(brk, 1, order)
    room_p_s = torch.gather(torch.where(active, room.pow(p), torch.zeros_like(room)), 1, order)
    c_p_s = torch.gather(c.pow(p), 1, order)
    clipped_p = torch.cumsum(room_p_s, dim=1)  # sum of b^p of coordinates 0..k (at the box)
    free_c_p = _suffix_sum(c_p_s)  # sum of c^p of coordinates k+1.. (still inside)
    # S at each breakpoint: S(t_k) = sum_{j<=k} b_j^p + t_k^p * sum_{j>k} c_j^p
    s_at = torch.where(torch.isfinite(brk_s), clipped_p + brk_s.pow(p) * free_c_p, torch.full_like(brk_s, math.inf))
    eps_p = eps.pow(p)[:, None]
    # The first breakpoint where S reaches eps^p ends the segment holding the solution;
    # on it, coordinates 0..k-1 sit at the box and S(t) = clipped_p[k-1] + t^p free_c_p[k-1].
    k = (s_at < eps_p).sum(dim=1, keepdim=True)  # S is increasing: a count is the first index
    full = k == s_at.shape[1]  # the whole box corner fits in the ball
    prev = (k - 1).clamp(0, s_at.shape[1] - 1)
    base_p = torch.where(k > 0, torch.gather(clipped_p, 1, prev), torch.zeros_like(eps_p))
    rate_p = torch.where(k > 0, torch.gather(free_c_p, 1, prev), c_p_s.sum(dim=1, keepdim=True))
    t = ((eps_p - base_p).clamp_min(0.0) / rate_p.clamp_min(1e-300)).pow(1.0 / p)
    t = torch.where(full, torch.full_like(t, math.inf), t)
    a = torch.where(active, torch.minimum(room, t * c), torch.zeros_like(room))
    # exact arithmetic puts ||a||_p = eps; rounding may overshoot by an ulp: scale back
    norm = a.pow(p).sum(dim=1, keepdim=True).pow(1.0 / p)
    over = norm > eps[:, None]
    return torch.where(over, a * (eps[:, None] / norm.clamp_min(1e-300)), a)
