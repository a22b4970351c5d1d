"""SVCE and the APGD baseline on models whose behaviour is known, and the measures of a change."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from causal_ie.counterfactuals import (
    SVCE,
    APGDCounterfactual,
    FindingLogits,
    counterfactual_metrics,
    finding_indices,
    lp_ball_box_lmo,
    lp_norm,
)
from causal_ie.data import FINDINGS
from causal_ie.explain.metrics import box_masks
from causal_ie.models import Classifier

SIZE = 16
# (x, y, w, h) of the region each of the first three findings looks at
BOXES = torch.tensor([[2.0, 3.0, 5.0, 4.0], [9.0, 8.0, 4.0, 6.0], [1.0, 10.0, 6.0, 5.0]])


pytestmark = pytest.mark.usefixtures("one_thread")


class BoxModel(nn.Module):
    """Logit k = <w_k, x - 0.5> with positive weights w_k inside box k only (findings 0-2; the rest 0).

    The logit is linear, so log y_k is monotone in it and the best counterfactual
    is the LMO vertex for -w_k (add) or w_k (remove): known exactly.
    """

    def __init__(self):
        super().__init__()
        inside = box_masks(BOXES, SIZE, SIZE).float()  # [3,H,W]
        w = torch.zeros(len(FINDINGS), 1, SIZE, SIZE)
        w[:3, 0] = inside * (0.2 + torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)))
        self.register_buffer("weight", w)
        self.findings = FINDINGS

    def forward(self, x):
        return torch.einsum("bchw,kchw->bk", x - 0.5, self.weight)


def images(n: int, seed: int = 1) -> torch.Tensor:
    return 0.2 + 0.6 * torch.rand(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_change_sits_in_the_box_the_model_reads():
    model, x = BoxModel(), images(3)
    result = SVCE(eps=2.0, p=1.5, steps=30)(model, x, [0, 1, 2], ["remove", "add", "remove"], boxes=BOXES)
    torch.testing.assert_close(result.metrics["box_mass_share"], torch.ones(3))
    outside = ~box_masks(BOXES, SIZE, SIZE)[:, None]
    assert (result.z - result.x)[outside].abs().max() == 0
    # linear logit: the optimum is the LMO vertex, and AFW reaches it
    w = model.weight[[0, 1, 2]]
    sign = torch.tensor([1.0, -1.0, 1.0]).view(3, 1, 1, 1)  # remove: minimise <w, z>; add: maximise it
    torch.testing.assert_close(result.z, lp_ball_box_lmo(sign * w, x, 2.0, 1.5), atol=1e-4, rtol=0)


def test_add_raises_and_remove_lowers_the_confidence():
    model, x = BoxModel(), images(4)
    for method in (SVCE(eps=1.0, steps=10), APGDCounterfactual(eps=1.0, steps=10)):
        result = method(model, x, "Cardiomegaly", ["add", "remove", "add", "remove"])
        up = result.confidence_after - result.confidence_before
        assert (up[[0, 2]] > 0.05).all() and (up[[1, 3]] < -0.05).all(), (method.name, up)
        assert result.directions == ["add", "remove", "add", "remove"]
        assert (result.finding == 1).all()


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0])
def test_svce_respects_its_ball(p):
    model, x = BoxModel(), images(3)
    eps = {1.0: 6.0, 1.5: 2.0, 2.0: 1.0}[p]
    result = SVCE(eps=eps, p=p, steps=10)(model, x, 0, "add")
    assert result.z.min() >= 0 and result.z.max() <= 1
    assert (lp_norm((result.z - result.x).double(), p) <= eps * (1 + 1e-5)).all()


def test_smaller_p_gives_sparser_changes():
    # p = 1 changes few pixels; p = 1.5 moves every useful pixel but puts more of the mass on few of them than p = 2
    model, x = BoxModel(), images(2)
    runs = {p: SVCE(eps=eps, p=p, steps=15)(model, x, 2, "add") for p, eps in ((1.0, 4.0), (1.5, 1.6), (2.0, 1.0))}
    l0 = {p: r.metrics["l0"] for p, r in runs.items()}
    assert (l0[1.0] < l0[1.5]).all(), l0
    top5 = {p: (r.z - r.x).abs().flatten(1).topk(5).values.sum(1) / r.metrics["l1"] for p, r in runs.items()}
    assert (top5[1.0] > top5[1.5]).all() and (top5[1.5] > top5[2.0]).all(), top5


def test_apgd_respects_the_same_l2_eps():
    model, x = BoxModel(), images(3)
    result = APGDCounterfactual(eps=0.5, steps=12)(model, x, [0, 1, 2], "add", boxes=BOXES)
    assert result.z.min() >= 0 and result.z.max() <= 1
    assert (result.metrics["l2"] <= 0.5 * (1 + 1e-5)).all()
    assert (result.confidence_after > result.confidence_before).all()
    # the same seed gives the same counterfactual
    again = APGDCounterfactual(eps=0.5, steps=12)(model, x, [0, 1, 2], "add")
    torch.testing.assert_close(again.z, result.z, rtol=0, atol=0)


def test_batch_size_does_not_change_the_result():
    model, x = BoxModel(), images(5)
    whole = SVCE(eps=1.5, steps=8, batch_size=8)(model, x, [0, 1, 2, 0, 1], "remove")
    pieces = SVCE(eps=1.5, steps=8, batch_size=2)(model, x, [0, 1, 2, 0, 1], "remove")
    torch.testing.assert_close(pieces.z, whole.z)
    torch.testing.assert_close(pieces.confidence_after, whole.confidence_after)


def test_tiny_classifier_mixed_targets_in_one_batch():
    from causal_ie.models import Classifier

    torch.manual_seed(0)
    model = Classifier(backbone="test_resnet", image_size=32)
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    result = SVCE(eps=3.0, steps=8)(model, x, ["Mass", "Edema", "Hernia"], ["add", "remove", "add"])
    moved = result.confidence_after - result.confidence_before
    assert moved[0] > 0 and moved[1] < 0 and moved[2] > 0
    assert model.training and all(q.requires_grad for q in model.parameters())  # left as found


def test_unknown_finding_lists_the_valid_ones():
    with pytest.raises(ValueError, match="finding='Cardiomegalie' is unknown; expected one of Atelectasis, Cardiomegaly"):
        SVCE(eps=1.0, steps=2)(BoxModel(), images(1), "Cardiomegalie")
    with pytest.raises(ValueError, match=r"expected an index in \[0, 14\)"):
        finding_indices(14, 1)
    with pytest.raises(ValueError, match="one finding or one per image"):
        finding_indices(["Mass", "Edema"], 3)
    assert finding_indices("Hernia", 2).tolist() == [13, 13]
    with pytest.raises(ValueError, match="direction='erase'"):
        SVCE(eps=1.0, steps=2)(BoxModel(), images(1), 0, "erase")


@pytest.mark.parametrize("eps", [0.0, -1.0, float("nan")])
def test_eps_must_be_positive(eps):
    with pytest.raises(ValueError, match="eps must be > 0"):
        SVCE(eps=eps)
    with pytest.raises(ValueError, match="eps must be > 0"):
        APGDCounterfactual(eps=eps)


def test_other_bad_settings():
    with pytest.raises(ValueError, match="p must be >= 1"):
        SVCE(eps=1.0, p=0.5)
    with pytest.raises(ValueError, match="optimizer='adam'"):
        SVCE(eps=1.0, optimizer="adam")
    with pytest.raises(ValueError, match="steps must be >= 2 for APGD"):
        APGDCounterfactual(eps=1.0, steps=1)
    with pytest.raises(ValueError, match=r"x must be a batch of images \[B,C,H,W\]"):
        SVCE(eps=1.0, steps=2)(BoxModel(), torch.rand(SIZE, SIZE), 0)


def test_finding_logits_cross_entropy_is_the_binary_loss():
    model, x = BoxModel(), images(2)
    logits = FindingLogits(model, torch.tensor([0, 2]))(x)
    y = torch.sigmoid(model(x)[:, [0, 2]].diagonal())
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1]), reduction="none")
    torch.testing.assert_close(ce, torch.stack([-torch.log1p(-y[0]), -torch.log(y[1])]), rtol=1e-5, atol=1e-5)


def test_metrics_against_hand_computed_values():
    x = torch.zeros(3, 1, 4, 4)
    z = x.clone()
    z[0, 0, 0, 0], z[0, 0, 1, 1], z[0, 0, 3, 3] = 0.5, -0.25, 1.0  # |change| 0.5, 0.25, 1.0
    z[1, 0, 2, 0] = 0.0005  # below the l0 threshold
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [math.nan] * 4, [0.0, 0.0, 4.0, 4.0]])
    markers = torch.tensor([[3.0, 3.0, 1.0, 1.0], [0.0, 2.0, 1.0, 1.0], [math.nan] * 4])
    m = counterfactual_metrics(x, z, boxes, markers)
    torch.testing.assert_close(m["l0"], torch.tensor([3.0, 0.0, 0.0]))
    torch.testing.assert_close(m["l1"], torch.tensor([1.75, 0.0005, 0.0]))
    torch.testing.assert_close(m["l2"], torch.tensor([math.sqrt(0.25 + 0.0625 + 1.0), 0.0005, 0.0]))
    torch.testing.assert_close(m["l1_5"], torch.tensor([(0.5**1.5 + 0.25**1.5 + 1.0) ** (2 / 3), 0.0005, 0.0]))
    share = m["box_mass_share"]
    assert share[0].item() == pytest.approx(0.75 / 1.75) and math.isnan(share[1]) and math.isnan(share[2])
    marker = m["marker_mass_share"]
    assert marker[0].item() == pytest.approx(1.0 / 1.75) and marker[1].item() == pytest.approx(1.0) and math.isnan(marker[2])
    assert torch.isnan(counterfactual_metrics(x, z)["box_mass_share"]).all()


def test_command_writes_results_figures_and_report(train_cfg, tmp_path):
    """`python -m causal_ie.counterfactuals experiment=shortcut` on a tiny trained checkpoint."""
    import json

    from conftest import compose_config

    from causal_ie.counterfactuals.command import run_counterfactuals
    from causal_ie.outputs.results import flatten
    from causal_ie.outputs.schema import COUNTERFACTUAL, problems
    from causal_ie.training import train

    train(train_cfg())  # tmp_path/checkpoints/best.ckpt
    out = tmp_path / "counterfactuals"
    cfg = compose_config(
        "counterfactuals",
        [
            "experiment=shortcut",
            "data.image_size=32",
            "data.synthetic.num_test=48",
            "counterfactual=[svce,apgd]",
            "counterfactual.steps=3",
            "counterfactual.num_images=2",
            "counterfactual.finding=[Pneumothorax,Effusion]",
            f"paths.checkpoint_search=[{tmp_path}]",
        ],
        out,
    )
    results, objects = run_counterfactuals(cfg)
    saved = flatten(json.loads((out / "results.json").read_text()))
    assert saved.keys() == flatten(results).keys()
    for method in ("svce", "apgd"):
        for key in ("confidence_before", "confidence_after", "l0", "l1", "l1_5", "l2", "box_mass_share", "marker_mass_share"):
            assert f"counterfactual.{method}.{key}" in saved, key
            assert f"counterfactual.{method}.per_finding.Pneumothorax.{key}" in saved, key
        assert saved[f"counterfactual.{method}.shortcut.finding"] == "Pneumothorax"
        assert saved[f"counterfactual.{method}.n"] == 4
        assert 0 <= saved[f"counterfactual.{method}.box_mass_share"] <= 1
    assert saved["run.checkpoint"] == str(tmp_path / "checkpoints" / "best.ckpt")
    assert saved["run.svce.p"] == 1.5
    assert problems(results, COUNTERFACTUAL) == []  # every key is described in the schema
    assert (objects["counterfactuals"]["apgd"].metrics["l2"] <= cfg.counterfactual.apgd.eps * (1 + 1e-5)).all()
    for path in objects["figures"].values():
        assert path.is_file() and path.stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "figures/counterfactuals.png" in report and "figures/mass_shares.png" in report
    # the numbers are in the report too, not only in results.json
    assert "## Counterfactuals" in report
    assert f"| svce | {saved['counterfactual.svce.n']} |" in report
    assert "planted marker: counterfactuals for Pneumothorax" in report
    # each figure row carries the CE map of its finding, computed on the same image
    from causal_ie.explain.explainers import PatchCE

    rows = objects["figure_rows"]
    assert rows and all(row["ce"].shape == (32, 32) for row in rows)
    pairs = objects["pairs"]
    i = rows[0]["pair"]
    ce = PatchCE(size=8, stride=4)(Classifier.load(tmp_path / "checkpoints" / "best.ckpt"), pairs.images[i : i + 1],
                                   torch.tensor([0]), pairs.finding[i : i + 1])
    np.testing.assert_allclose(rows[0]["ce"], ce[0].numpy(), atol=1e-6)
