"""The approximate tier (causal_ie.interventions.approx): settings, exact limits, budgets, error measures."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from causal_ie.explain.explainers import PatchCE, approx_errors
from causal_ie.interventions import InterventionSpec, WindowGrid, causal_effect
from causal_ie.interventions.approx import (
    ApproxSettings,
    ProjectiveFieldForward,
    approximate_causal_effect,
    coarse_axis,
    interpolation_matrix,
    map_agreement,
)
from causal_ie.outputs.schema import EVALUATION_RUN, problems
from causal_ie.models.random_weights import randomise_batchnorm
from conftest import compose_config
from test_incremental import images, timm_model

pytestmark = pytest.mark.usefixtures("one_thread")


def classifier(size: int = 32) -> nn.Module:
    from causal_ie.models import Classifier

    torch.manual_seed(0)
    return randomise_batchnorm(Classifier(backbone="test_resnet", image_size=size))


class Counting(nn.Module):
    """A model that counts the images it forwards (plain forwards: incremental=False)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.seen = model, 0

    def forward(self, x):
        self.seen += x.shape[0]
        return self.model(x)


# ---------------------------------------------------------------- settings


def test_settings_parse_and_validate():
    assert ApproxSettings.of(None) is None and ApproxSettings.of("null") is None
    a = ApproxSettings.of("drilldown+bf16", tau=0.7)
    assert a.methods == ("bf16", "drilldown") and a.name == "bf16+drilldown" and a.tau == 0.7
    assert ApproxSettings.of(["projective"]).methods == ("projective",)
    for bad, match in [("fast", "mask.approx"), ("bf16", "tau")]:
        with pytest.raises(ValueError, match=match):
            ApproxSettings.of(bad, tau=1.5) if match == "tau" else ApproxSettings.of(bad)
    with pytest.raises(ValueError, match="coarse"):
        ApproxSettings.of("drilldown", coarse=0)
    with pytest.raises(ValueError, match="refine"):
        ApproxSettings.of("drilldown", refine=2.0)


def test_interpolation_helpers():
    assert coarse_axis(7, 2) == [0, 2, 4, 6] and coarse_axis(6, 2) == [0, 2, 4, 5] and coarse_axis(3, 5) == [0, 2]
    a = interpolation_matrix(6, [0, 2, 4, 5], torch.float64, torch.device("cpu"))
    values = torch.tensor([1.0, 3.0, 5.0, 6.0], dtype=torch.float64)
    torch.testing.assert_close(a @ values, torch.arange(1.0, 7.0, dtype=torch.float64))  # linear in the index


# ---------------------------------------------------------------- exact limits


def test_projective_tau_one_is_exact_and_smaller_tau_truncates():
    model = classifier()
    x = images(2)
    exact = causal_effect(model, x, window=6, stride=4)
    same = approximate_causal_effect(model, x, window=6, stride=4, approx=ApproxSettings.of("projective", tau=1.0))
    assert (same - exact).abs().max() <= 1e-6
    fwd = ProjectiveFieldForward(model, x, tau=0.5)
    geometry, _ = fwd.planner.geometry((6, 6))
    windows = [n for n, op in fwd.analysis.ops.items() if op.kind == "window" and n in geometry]
    assert windows
    for name in windows:
        g = geometry[name]
        for axis in (0, 1):
            assert g.size[axis] <= max(1, -(-g.map_size[axis] // 2))  # at most half the side (rounded up)
    approx = approximate_causal_effect(model, x, window=6, stride=4, approx=ApproxSettings.of("projective", tau=0.5))
    assert approx.shape == exact.shape and torch.isfinite(approx).all()


def test_drilldown_refining_everything_is_exact():
    model = classifier()
    x = images(2)
    exact = causal_effect(model, x, window=5, stride=4)  # uneven tiling: clipped last windows
    for coarse, refine in [(2, 1.0), (1, 0.0)]:
        approx = ApproxSettings.of("drilldown", coarse=coarse, refine=refine)
        maps = approximate_causal_effect(model, x, window=5, stride=4, approx=approx)
        assert (maps - exact).abs().max() <= 1e-5


def test_drilldown_computes_the_coarse_windows_and_the_budget_only():
    model = Counting(classifier())
    x = images(2)
    grid = WindowGrid.create((32, 32), 6, 2)  # 14 x 14 windows
    approx = ApproxSettings.of("drilldown", coarse=3, refine=0.1, rounds=0)
    spec = InterventionSpec(incremental=False, batch_size=32)
    maps = approximate_causal_effect(model, x, window=6, stride=2, approx=approx, spec=spec)
    coarse = len(coarse_axis(14, 3)) ** 2  # 6 x 6
    budget = round(0.1 * len(grid))
    assert model.seen == 2 * (2 + coarse + budget)  # per image: twice the clean image, coarse windows, refined ones
    exact = causal_effect(model.model, x, window=6, stride=2)
    found = map_agreement(maps, exact, (6, 6))
    assert found["rel_error"].shape == (2 * 14,)
    assert float(found["rel_error"].min()) < 1.0


def test_drilldown_rounds_put_every_maximum_on_exact_windows():
    """Stage 3: once the rounds settle, each map's value at its maximum is the exact map's value there."""
    model = classifier()
    x = images(2)
    approx = ApproxSettings.of("drilldown", coarse=3, refine=0.05, rounds=50)
    maps = approximate_causal_effect(model, x, window=6, stride=2, approx=approx)
    exact = causal_effect(model, x, window=6, stride=2)
    top = maps.flatten(2).argmax(-1, keepdim=True)
    torch.testing.assert_close(maps.flatten(2).gather(2, top), exact.flatten(2).gather(2, top), atol=1e-5, rtol=0)
    assert not torch.allclose(maps, exact, atol=1e-5)  # still an approximation elsewhere


def test_bf16_is_close_and_float32(caplog):
    """bfloat16 autocast, incremental (its exactness check is off: no fallback to plain forwards)."""
    import logging

    model = timm_model("test_resnet")
    x = images(2)
    exact = causal_effect(model, x, window=8, stride=4, outcome="logit")
    with caplog.at_level(logging.WARNING, logger="causal_ie.interventions.incremental"):
        approx = approximate_causal_effect(
            model, x, window=8, stride=4, approx=ApproxSettings.of("bf16"), spec=InterventionSpec(outcome="logit")
        )
    assert not [r for r in caplog.records if "plain forward" in r.getMessage()]
    assert approx.dtype == torch.float32
    # bfloat16 keeps 8 significant bits: logit differences of 1e-2 are a few of its steps
    scale = float(exact.abs().max())
    assert 0 < float((approx - exact).abs().max()) <= 0.5 * scale
    assert torch.corrcoef(torch.stack([approx.flatten(), exact.flatten()]))[0, 1] > 0.8


def test_differentiable_approx_is_refused():
    with pytest.raises(ValueError, match="differentiable"):
        approximate_causal_effect(
            classifier(), images(1), window=8, stride=8, approx=ApproxSettings.of("bf16"),
            spec=InterventionSpec(differentiable=True),
        )


# ---------------------------------------------------------------- measured error


def test_map_agreement_by_hand():
    exact = torch.zeros(3, 8, 8)
    exact[:, 2, 2] = 1.0
    approx = exact.clone()
    approx[1] = 0.0
    approx[1, 3, 4] = 0.9  # within one 4x4 window of the exact maximum, not on it
    approx[2] = 0.0
    approx[2, 7, 7] = 2.0  # far away
    found = map_agreement(approx, exact, (4, 4))
    assert found["same_place"].tolist() == [True, False, False]
    assert found["same_window"].tolist() == [True, True, False]
    torch.testing.assert_close(found["rel_error"], torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64))


def test_patch_explainer_measures_its_error_on_the_first_images():
    model = classifier()
    explainer = PatchCE(size=6, stride=4, approx="drilldown", approx_check=1, approx_settings={"refine": 0.2})
    assert explainer.approx_error is None
    x = images(3)
    maps = explainer.all_findings(model, x)
    assert maps.shape == (3, 14, 32, 32)
    explainer.all_findings(model, x)  # the check is spent: no more exact maps
    error = explainer.approx_error
    assert error["images"] == 1 and error["maps"] == 14 and error["method"] == "drilldown"
    assert 0 <= error["pointing_agreement"] <= error["window_agreement"] <= 1
    assert error["refine"] == 0.2 and error["coarse"] == 2 and error["rounds"] == 3 and "tau" not in error
    run = {"run": {"ce": {"approx_error": error}}}
    assert problems(run["run"], EVALUATION_RUN) == []
    assert approx_errors({"ce": explainer, "other": PatchCE()}) == {"ce": error}
    assert PatchCE().approx is None and PatchCE().approx_error is None


def test_hydra_keys_build_the_approximate_explainer_and_the_engine(tmp_path):
    cfg = compose_config(
        "evaluate",
        ["mask.approx=drilldown+projective", "mask.approx_check=2", "mask.approx_settings.tau=0.75",
         "engine.compile=true", "engine.channels_last=false"],
        tmp_path,
    )
    explainer = instantiate(cfg.mask, _convert_="all")
    assert explainer.approx.methods == ("projective", "drilldown") and explainer.approx.tau == 0.75
    assert explainer.approx.check == 2
    engine = explainer.intervention.engine
    assert engine.compile is True and engine.channels_last is False
    latent = instantiate(cfg.latent, _convert_="all")
    assert latent.intervention.engine == engine
    default = instantiate(compose_config("evaluate", [], tmp_path).mask, _convert_="all")
    assert default.approx is None and default.intervention.engine.compile is False
    assert default.intervention.engine.channels_last is True
