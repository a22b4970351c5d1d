"""The lp-ball ∩ box LMO against scipy references: feasible, optimal, batched, clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linprog, minimize

from causal_ie.counterfactuals import lp_ball_box_lmo, lp_norm
from causal_ie.counterfactuals.lmo import _lp_magnitudes

INF = math.inf


def problem(seed: int, d: int | None = None, border: bool = False):
    """A random instance: gradient, centre (some coordinates on the box border) and a radius."""
    rng = np.random.default_rng(seed)
    d = d or int(rng.integers(5, 13))
    g = rng.normal(size=d)
    x = rng.uniform(0, 1, size=d)
    if border:
        x[rng.random(d) < 0.4] = 0.0
        x[rng.random(d) < 0.3] = 1.0
    eps = float(rng.uniform(0.1, 1.5))
    return g, x, eps


def lmo_np(g, x, eps, p) -> np.ndarray:
    z = lp_ball_box_lmo(torch.tensor(g)[None], torch.tensor(x)[None], eps, p)
    return z[0].numpy()


def feasible(z, x, eps, p, rtol=1e-6) -> bool:
    norm = np.abs(z - x).max() if math.isinf(p) else (np.abs(z - x) ** p).sum() ** (1 / p)
    return bool((z >= 0).all() and (z <= 1).all() and norm <= eps * (1 + rtol) + 1e-12)


def reference_nlp(g, x, eps, p, starts: int = 6) -> float:
    """min <g,z> over the box ∩ lp ball by SLSQP from several feasible random starts."""
    rng = np.random.default_rng(0)
    best = INF
    cons = {
        "type": "ineq",
        "fun": lambda z: eps**p - (np.abs(z - x) ** p).sum(),
        "jac": lambda z: -p * np.abs(z - x) ** (p - 1) * np.sign(z - x),
    }
    for _ in range(starts):
        direction = rng.normal(size=x.shape)
        z0 = np.clip(x + 0.5 * eps * direction / (np.abs(direction) ** p).sum() ** (1 / p), 0, 1)
        res = minimize(
            lambda z: g @ z, z0, jac=lambda z: g, bounds=[(0, 1)] * len(x), constraints=[cons],
            method="SLSQP", options={"ftol": 1e-13, "maxiter": 500},
        )
        if feasible(res.x, x, eps, p, rtol=1e-7):
            best = min(best, float(g @ res.x))
    assert best < INF, "the reference solver found no feasible point"
    return best


def reference_lp(g, x, eps, p) -> float:
    """Exact LP optimum for p = 1 (z, u with |z - x| <= u, sum u <= eps) or p = inf (bounds)."""
    d = len(x)
    if math.isinf(p):
        bounds = list(zip(np.maximum(0, x - eps), np.minimum(1, x + eps)))
        return float(linprog(g, bounds=bounds, method="highs").fun)
    eye = np.eye(d)
    a_ub = np.block([[eye, -eye], [-eye, -eye], [np.zeros((1, d)), np.ones((1, d))]])
    b_ub = np.concatenate([x, -x, [eps]])
    res = linprog(np.concatenate([g, np.zeros(d)]), A_ub=a_ub, b_ub=b_ub, bounds=[(0, 1)] * d + [(0, None)] * d, method="highs")
    return float(res.fun)


@pytest.mark.parametrize("p", [1.5, 2.0, 3.0])
@pytest.mark.parametrize("seed", range(6))
def test_lp_matches_scipy_reference(p, seed):
    g, x, eps = problem(seed, border=seed % 2 == 1)
    z = lmo_np(g, x, eps, p)
    assert feasible(z, x, eps, p)
    assert g @ z <= reference_nlp(g, x, eps, p) + 1e-4


@pytest.mark.parametrize("p", [1.0, INF])
@pytest.mark.parametrize("seed", range(6))
def test_l1_and_linf_match_linear_program(p, seed):
    g, x, eps = problem(seed, border=seed % 2 == 1)
    z = lmo_np(g, x, eps, p)
    assert feasible(z, x, eps, p)
    assert g @ z == pytest.approx(reference_lp(g, x, eps, p), abs=1e-9)


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 3.0, INF])
def test_no_feasible_point_is_better(p):
    # larger d: the vertex beats many random feasible points and the ball's boundary
    rng = np.random.default_rng(7)
    g, x, eps = rng.normal(size=300), rng.uniform(size=300), 2.0
    z = lmo_np(g, x, eps, p)
    assert feasible(z, x, eps, p)
    for _ in range(200):
        u = rng.normal(size=300) * (rng.random(300) < rng.random())
        scale = np.abs(u).max() if math.isinf(p) else (np.abs(u) ** p).sum() ** (1 / p)
        other = np.clip(x + eps * u / max(scale, 1e-12), 0, 1)
        assert g @ z <= g @ other + 1e-12


def test_zero_radius_returns_x():
    g, x, _ = problem(1)
    for p in (1.0, 1.5, 2.0, INF):
        np.testing.assert_array_equal(lmo_np(g, x, 0.0, p), x)


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 3.0, INF])
def test_radius_beyond_the_box_gives_the_corner(p):
    g, x, _ = problem(2)
    corner = np.where(g > 0, 0.0, 1.0)
    np.testing.assert_allclose(lmo_np(g, x, 100.0, p), corner, atol=1e-12)
    np.testing.assert_allclose(lmo_np(g, x, INF, p), corner, atol=1e-12)


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, INF])
def test_zero_gradient_stays_at_x(p):
    _, x, eps = problem(3)
    np.testing.assert_array_equal(lmo_np(np.zeros_like(x), x, eps, p), x)


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 3.0, INF])
def test_centre_on_the_box_border(p):
    x = np.array([0.0, 1.0, 0.0, 1.0, 0.5, 0.3])
    g = np.array([1.0, -1.0, -0.5, 0.5, 0.2, -2.0])  # first two push out of the box
    z = lmo_np(g, x, 0.6, p)
    assert feasible(z, x, 0.6, p)
    assert z[0] == 0.0 and z[1] == 1.0  # no room in the gradient's direction
    ref = reference_lp(g, x, 0.6, p) if p in (1.0, INF) else reference_nlp(g, x, 0.6, p)
    assert g @ z <= ref + 1e-4


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, INF])
def test_batch_with_one_radius_per_row_equals_rows(p):
    rows = [problem(s, d=9) for s in range(4)]
    g = torch.tensor(np.stack([r[0] for r in rows]))
    x = torch.tensor(np.stack([r[1] for r in rows]))
    eps = torch.tensor([0.0, 0.2, 0.9, 50.0])
    z = lp_ball_box_lmo(g, x, eps, p)
    for i in range(4):
        np.testing.assert_array_equal(z[i].numpy(), lmo_np(rows[i][0], rows[i][1], float(eps[i]), p))


def test_image_shaped_input_equals_flat():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(3, 1, 5, 6, generator=gen, dtype=torch.float64)
    x = torch.rand(3, 1, 5, 6, generator=gen, dtype=torch.float64)
    z = lp_ball_box_lmo(g, x, 1.2, 1.5)
    assert z.shape == x.shape
    torch.testing.assert_close(z.flatten(1), lp_ball_box_lmo(g.flatten(1), x.flatten(1), 1.2, 1.5), rtol=0, atol=0)


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, INF])
def test_float32_output_is_feasible_in_float32(p):
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(4, 1, 32, 32, generator=gen)
    x = torch.rand(4, 1, 32, 32, generator=gen)
    eps = torch.tensor([0.3, 1.0, 4.0, 10.0])
    z = lp_ball_box_lmo(g, x, eps, p)
    assert z.dtype == torch.float32
    assert (z >= 0).all() and (z <= 1).all()
    norms = lp_norm((z.double() - x.double()), p)
    assert (norms <= eps.double() * (1 + 1e-12)).all()
    exact = lp_norm(lp_ball_box_lmo(g.double(), x.double(), eps, p) - x.double(), p)
    torch.testing.assert_close(norms, exact, rtol=1e-5, atol=0)  # nothing lost to rounding


def test_errors_name_the_argument():
    g, x = torch.randn(2, 5), torch.rand(2, 5)
    with pytest.raises(ValueError, match="p must be >= 1"):
        lp_ball_box_lmo(g, x, 1.0, 0.5)
    with pytest.raises(ValueError, match="p must be"):
        lp_ball_box_lmo(g, x, 1.0, "two")
    with pytest.raises(ValueError, match="p must be >= 1"):
        lp_ball_box_lmo(g, x, 1.0, float("nan"))
    with pytest.raises(ValueError, match="needs 1 < p < inf"):
        _lp_magnitudes(g.abs().double(), x.double(), torch.ones(2, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        lp_ball_box_lmo(g, x, -0.1, 1.5)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        lp_ball_box_lmo(g, x, torch.tensor([1.0, -1.0]), 1.5)
    with pytest.raises(ValueError, match="eps must not be NaN"):
        lp_ball_box_lmo(g, x, float("nan"), 1.5)
    with pytest.raises(ValueError, match=r"eps must be a float or a tensor of shape \[2\]"):
        lp_ball_box_lmo(g, x, torch.ones(3), 1.5)
    with pytest.raises(ValueError, match="grad and x must have the same shape"):
        lp_ball_box_lmo(g, x[:, :4], 1.0, 1.5)
    with pytest.raises(ValueError, match="x must lie in the box"):
        lp_ball_box_lmo(g, x + 1.0, 1.0, 1.5)
    with pytest.raises(ValueError, match="grad must be finite"):
        lp_ball_box_lmo(torch.full_like(g, float("nan")), x, 1.0, 1.5)
    with pytest.raises(ValueError, match="batch dimension"):
        lp_ball_box_lmo(torch.tensor(1.0), torch.tensor(0.5), 1.0, 1.5)
