"""Auto-Frank-Wolfe: better than fixed-step Frank-Wolfe, always feasible, per-image, on budget."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from causal_ie.counterfactuals import auto_frank_wolfe, checkpoint_schedule, frank_wolfe, lp_norm


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cnn(seed: int = 0, scale: float = 5.0) -> nn.Module:
    """A seeded two-layer ReLU CNN, weights scaled up so the objective bends inside the ball."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 14),
    )
    with torch.no_grad():
        for w in list(model.parameters())[:4]:
            w.mul_(scale)
    return model.eval().requires_grad_(False)


def images(n: int, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


class Recorder:
    """Wraps an objective, keeping every point it was asked about."""

    def __init__(self, objective):
        self.objective, self.points, self.values = objective, [], []

    def __call__(self, z):
        self.points.append(z.detach().clone())
        value = self.objective(z)
        self.values.append(value.detach().clone())
        return value


def logit_objective(model, finding):
    return lambda z: model(z).gather(1, finding[:, None])[:, 0]


def test_afw_beats_fixed_step_frank_wolfe_on_a_tiny_model():
    model, x = tiny_cnn(), images(8)
    objective = logit_objective(model, torch.arange(8))
    for p, eps, steps in ((1.5, 4.0, 20), (2.0, 1.0, 20)):
        afw = auto_frank_wolfe(objective, x, eps, p, steps)
        fw = frank_wolfe(objective, x, eps, p, steps)
        gain = afw.value - fw.value
        assert gain.mean() > 0, (p, gain)
        assert (gain > 0).sum() >= 7, (p, gain)


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, math.inf])
def test_every_iterate_is_feasible(p):
    model, x = tiny_cnn(), images(4)
    eps = torch.tensor([0.5, 1.0, 3.0, 8.0]) if not math.isinf(p) else torch.tensor([0.02, 0.05, 0.1, 0.3])
    record = Recorder(logit_objective(model, torch.tensor([0, 3, 5, 13])))
    result = auto_frank_wolfe(record, x, eps, p, 25)
    for z in [*record.points, result.x]:
        assert z.min() >= 0 and z.max() <= 1
        assert (lp_norm((z - x).double(), p) <= eps.double() * (1 + 1e-5)).all()


def test_result_is_the_best_point_seen():
    model, x = tiny_cnn(), images(4)
    record = Recorder(logit_objective(model, torch.tensor([1, 2, 3, 4])))
    result = auto_frank_wolfe(record, x, 3.0, 1.5, 15)
    seen = torch.stack(record.values)  # [steps, B]
    torch.testing.assert_close(result.values, seen)
    torch.testing.assert_close(result.value, seen.max(dim=0).values)
    torch.testing.assert_close(result.history, seen.cummax(dim=0).values)
    with torch.no_grad():
        torch.testing.assert_close(record.objective(result.x), result.value)
    # minimising reports the smallest value seen, in the caller's sign
    low = auto_frank_wolfe(record, x, 3.0, 1.5, 10, maximize=False)
    assert (low.value < seen[0]).all()
    torch.testing.assert_close(low.value, low.values.min(dim=0).values)


def test_different_targets_per_image_equal_single_runs():
    model, x = tiny_cnn(), images(3)
    finding = torch.tensor([2, 7, 11])
    add = torch.tensor([True, False, True])

    def objective(z, finding=finding, add=add):
        logit = model(z).gather(1, finding[:, None])[:, 0]
        return F.logsigmoid(torch.where(add, logit, -logit))

    batch = auto_frank_wolfe(objective, x, torch.tensor([1.0, 2.0, 3.0]), 1.5, 10)
    for i, eps in enumerate((1.0, 2.0, 3.0)):
        alone = auto_frank_wolfe(
            lambda z, i=i: objective(z, finding[i : i + 1], add[i : i + 1]), x[i : i + 1], eps, 1.5, 10
        )
        torch.testing.assert_close(batch.x[i : i + 1], alone.x, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        before = model(x).gather(1, finding[:, None])[:, 0]
        after = model(batch.x).gather(1, finding[:, None])[:, 0]
    assert after[0] > before[0] and after[1] < before[1] and after[2] > before[2]


@pytest.mark.parametrize("steps", [1, 2, 7, 12])
def test_budget_is_the_number_of_objective_passes(steps):
    model, x = tiny_cnn(), images(2)
    for run in (auto_frank_wolfe, frank_wolfe):
        record = Recorder(logit_objective(model, torch.tensor([0, 1])))
        result = run(record, x, 1.0, 1.5, steps)
        assert len(record.points) == steps
        assert result.values.shape == result.history.shape == (steps, 2)


def test_checkpoints_follow_apgd():
    assert checkpoint_schedule(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoint_schedule(10) == [2, 4, 6, 7, 8, 9]
    assert checkpoint_schedule(1) == []


def test_a_stalling_image_halves_its_step_and_restarts():
    # concave, maximiser c strictly inside the ball: a constant step oscillates around it
    x = torch.full((2, 16), 0.5, dtype=torch.float64)
    c = x + torch.linspace(-0.1, 0.1, 16, dtype=torch.float64)
    result = auto_frank_wolfe(lambda z: -((z - c) ** 2).sum(dim=1), x, 1.0, 2.0, 60)
    assert (result.restarts > 0).all()
    assert (result.step_size < 0.75).all()
    assert (result.value > -5e-3).all()  # close to the optimum 0 at z = c


def test_converges_to_the_projection_of_an_outside_point():
    # max -||z - c||^2 over the l2 ball (inside the box) is the projection x + eps (c - x) / ||c - x||
    gen = torch.Generator().manual_seed(0)
    x = 0.4 + 0.2 * torch.rand(3, 10, generator=gen, dtype=torch.float64)
    direction = torch.randn(3, 10, generator=gen, dtype=torch.float64)
    c = x + direction
    eps = 0.1
    result = auto_frank_wolfe(lambda z: -((z - c) ** 2).sum(dim=1), x, eps, 2.0, 100)
    expected = x + eps * direction / direction.norm(dim=1, keepdim=True)
    assert (result.x - expected).norm(dim=1).max() < 5e-3


def test_errors_name_the_argument():
    x = images(2)
    objective = logit_objective(tiny_cnn(), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        auto_frank_wolfe(objective, x, 1.0, 1.5, 0)
    with pytest.raises(ValueError, match="step_size must be in"):
        auto_frank_wolfe(objective, x, 1.0, 1.5, 5, step_size=1.5)
    with pytest.raises(ValueError, match="momentum must be in"):
        auto_frank_wolfe(objective, x, 1.0, 1.5, 5, momentum=1.0)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        auto_frank_wolfe(objective, x, -1.0, 1.5, 5)
    with pytest.raises(ValueError, match="p must be >= 1"):
        frank_wolfe(objective, x, 1.0, 0.5, 5)
    with pytest.raises(ValueError, match="x_init must be feasible"):
        auto_frank_wolfe(objective, x, 0.1, 2.0, 5, x_init=(x + 0.5).clamp(0, 1))
    with pytest.raises(ValueError, match="one value per image"):
        auto_frank_wolfe(lambda z: z.sum(), x, 1.0, 1.5, 5)
