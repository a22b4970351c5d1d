"""Unknown labels (NaN: an uncertain CheXpert label under data.uncertain=ignore) are left out of
the training loss, of every AUROC and of its interval, not counted as negatives."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from causal_ie.explain.intervals import classification_intervals
from causal_ie.models import Classifier
from causal_ie.models.auroc import auroc_targets, label_auroc, per_label


def test_the_loss_is_the_mean_bce_of_the_known_labels_only():
    model = Classifier(backbone="test_resnet", pos_weight=[3.0] * 14)
    torch.manual_seed(0)
    logits = torch.randn(4, 14, requires_grad=True)
    labels = (torch.rand(4, 14) > 0.5).float()
    labels[0, :5] = float("nan")
    labels[2, 7] = float("nan")
    known = ~torch.isnan(labels)
    # by hand: -(w y log s + (1 - y) log(1 - s)) on the known entries, averaged over their count
    s = logits[known].sigmoid()
    y = labels[known]
    expected = -(3.0 * y * s.log() + (1 - y) * (1 - s).log()).mean()
    loss = model.loss(logits, labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert torch.all(logits.grad[~known] == 0) and torch.all(logits.grad[known] != 0)
    # without unknown labels it is the plain BCE, and all unknown adds nothing
    full = (torch.rand(4, 14) > 0.5).float()
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits, full, pos_weight=model.pos_weight)
    assert model.loss(logits, full).item() == pytest.approx(plain.item())
    assert model.loss(logits, torch.full((4, 14), float("nan"))).item() == 0.0


@pytest.mark.parametrize("k", [1, 3])
def test_auroc_leaves_unknown_labels_out(k):
    rng = np.random.default_rng(1)
    probs = rng.random((40, k)).astype(np.float32)
    labels = (rng.random((40, k)) > 0.5).astype(np.float32)
    labels[::4, 0] = np.nan
    metric = label_auroc(k)
    metric.update(torch.from_numpy(probs), auroc_targets(torch.from_numpy(labels)))
    got = per_label(metric.compute()).numpy()
    for j in range(k):
        rows = ~np.isnan(labels[:, j])
        assert got[j] == pytest.approx(roc_auc_score(labels[rows, j], probs[rows, j]), abs=1e-6)
    # counting them as negatives would give another number
    assert roc_auc_score(np.nan_to_num(labels[:, 0]), probs[:, 0]) != pytest.approx(got[0], abs=1e-6)


def test_auroc_intervals_resample_only_the_known_labels():
    """A finding whose unknown rows are dropped has the interval of the known rows alone."""
    rng = np.random.default_rng(2)
    probs = rng.random((60, 2))
    labels = (rng.random((60, 2)) > 0.5).astype(float)
    groups = [str(i // 2) for i in range(60)]
    with_unknown = labels.copy()
    with_unknown[::3, 1] = np.nan
    out = classification_intervals(probs, with_unknown, groups, np.array([True, True]), ("A", "B"), 300, 0)
    rows = ~np.isnan(with_unknown[:, 1])
    alone = classification_intervals(probs[rows][:, [1]], labels[rows][:, [1]], [g for g, r in zip(groups, rows) if r],
                                     np.array([True]), ("B",), 300, 0)
    assert np.isfinite(out["auroc_mean_ci_low"])
    assert out["auroc"]["B_ci_low"] == pytest.approx(alone["auroc"]["B_ci_low"], abs=0.05)
    assert out["auroc"]["B_ci_high"] == pytest.approx(alone["auroc"]["B_ci_high"], abs=0.05)


@pytest.mark.parametrize("k", [1, 3])
def test_a_label_unknown_on_every_image_has_a_nan_auroc(k):
    """A model output the data does not annotate is NaN on every image: its AUROC is NaN, the
    others are computed (torchmetrics alone fails on such a column)."""
    probs = torch.rand(6, k)
    labels = torch.tensor([[1.0], [0.0], [1.0], [0.0], [1.0], [0.0]]).repeat(1, k)
    labels[:, -1] = float("nan")
    metric = label_auroc(k)
    metric.update(probs, auroc_targets(labels))
    got = per_label(metric.compute())
    assert torch.isnan(got[-1]) and not torch.isnan(got[:-1]).any()


def test_a_label_of_one_class_has_a_nan_auroc_not_zero():
    """torchmetrics gives 0 where the test images hold one class of a finding; a mean over
    findings would count that 0. It is undefined: NaN, and the mean leaves it out."""
    from causal_ie.models.findings import finding_aurocs

    probs = torch.tensor([[0.9, 0.2], [0.1, 0.7], [0.8, 0.4], [0.3, 0.1]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    metric = label_auroc(2)
    metric.update(probs, auroc_targets(labels))
    got = per_label(metric.compute())
    assert got[0] == 1.0 and torch.isnan(got[1])
    mean, _ = finding_aurocs(got, torch.tensor([True, True]))
    assert mean == 1.0


def test_the_logged_mean_auroc_leaves_undefined_findings_out(monkeypatch):
    """val/auroc_mean is the mean over the findings with both classes in the split; with none it
    is NaN, and the default early stopping does not stop on it (check_finite: false)."""
    from omegaconf import OmegaConf

    from conftest import ROOT

    model = Classifier(backbone="test_resnet")
    logged = {}
    monkeypatch.setattr(model, "log", lambda name, value, **kw: logged.__setitem__(name, float(value)))
    probs = torch.rand(6, 14)
    labels = torch.zeros(6, 14)
    labels[:3, 0] = 1.0  # only finding 0 has both classes
    probs[:3, 0] = 0.9
    probs[3:, 0] = 0.1
    model.val_auroc.update(probs, auroc_targets(labels))
    model._log_auroc("val", model.val_auroc)
    assert logged["val/auroc_mean"] == 1.0 and math.isnan(logged["val/auroc/Cardiomegaly"])
    model.val_auroc.update(probs, auroc_targets(torch.zeros(6, 14)))
    model._log_auroc("val", model.val_auroc)
    assert math.isnan(logged["val/auroc_mean"])
    assert OmegaConf.load(ROOT / "conf" / "callbacks" / "default.yaml").early_stopping.check_finite is False
