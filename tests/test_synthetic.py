"""SyntheticCXR: deterministic, multi-label, each finding only inside its box; the shortcut marker."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from causal_ie.data import FINDINGS, finding_index
from causal_ie.data.synthetic import SyntheticCXR


def box_mask(box, size):
    x, y, w, h = box
    c = np.arange(size) + 0.5
    cols = (c >= x) & (c < x + w)
    rows = (c >= y) & (c < y + h)
    return rows[:, None] & cols[None, :]


def test_items_are_deterministic_per_seed_and_index():
    a, b = SyntheticCXR(20, 32, seed=3), SyntheticCXR(20, 32, seed=3, cache_mb=0)
    for i in (0, 7, 19):
        ia, ib = a[i], b[i]
        assert torch.equal(ia["image"], ib["image"])
        assert torch.equal(ia["labels"], ib["labels"])
        assert torch.equal(ia["boxes"].nan_to_num(-1), ib["boxes"].nan_to_num(-1))
    # cached second read is the same too
    assert torch.equal(a[7]["image"], b[7]["image"])
    other = SyntheticCXR(20, 32, seed=4)
    assert not torch.equal(a[0]["image"], other[0]["image"])


def test_item_format():
    ds = SyntheticCXR(8, 48, seed=0, prevalence=0.5)
    item = ds[2]
    assert item["image"].shape == (1, 48, 48) and item["image"].dtype == torch.float32
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert item["labels"].shape == (14,) and set(item["labels"].tolist()) <= {0.0, 1.0}
    assert item["boxes"].shape == (14, 4)
    present = item["labels"] > 0.5
    assert not torch.isnan(item["boxes"][present]).any()
    assert torch.isnan(item["boxes"][~present]).all()
    x, y, w, h = item["boxes"][present].T
    assert (x >= 0).all() and (y >= 0).all() and (x + w <= 48).all() and (y + h <= 48).all()
    assert item["id"] == item["patient_id"] == "synthetic-0-2"
    assert torch.isnan(item["spurious_box"]).all()


def test_labels_are_multilabel_with_the_given_prevalence():
    ds = SyntheticCXR(2000, 16, seed=1, prevalence=0.2)
    labels = ds.label_matrix()
    assert labels.shape == (2000, 14)
    np.testing.assert_allclose(labels.mean(0), 0.2, atol=0.04)
    assert (labels.sum(1) >= 2).mean() > 0.5  # many images carry several findings
    assert np.array_equal(labels[5], ds[5]["labels"].numpy())


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("finding", FINDINGS)
def test_each_finding_changes_only_pixels_inside_its_box(finding, size):
    ds = SyntheticCXR(10, size, seed=2, prevalence=0.3)
    k = finding_index(finding)
    for index in range(3):
        labels = ds.labels_of(index)
        on, off = labels.copy(), labels.copy()
        on[k], off[k] = 1.0, 0.0
        with_finding, boxes, _ = ds.render(index, on)
        without, boxes_off, _ = ds.render(index, off)
        inside = box_mask(boxes[k], size)
        diff = np.abs(with_finding - without)
        assert diff[~inside].max() == 0.0, f"{finding} drew outside its box"
        assert diff[inside].max() > 0.05, f"{finding} is invisible in its box"
        assert np.isnan(boxes_off[k]).all()
        # the other findings' boxes do not move
        others = np.arange(14) != k
        np.testing.assert_array_equal(np.nan_to_num(boxes[others], nan=-1), np.nan_to_num(boxes_off[others], nan=-1))


def test_boxes_scale_with_the_image_size():
    small, large = SyntheticCXR(5, 64, seed=0, prevalence=0.5), SyntheticCXR(5, 128, seed=0, prevalence=0.5)
    for i in range(5):
        a, b = small[i]["boxes"], large[i]["boxes"]
        present = ~torch.isnan(a).any(1)
        assert torch.equal(present, ~torch.isnan(b).any(1))
        # same place in image coordinates; margins are a few pixels at either size
        torch.testing.assert_close(b[present] / 2, a[present], atol=5.0, rtol=0)


def test_spurious_marker_agrees_with_its_finding_with_probability_p():
    ds = SyntheticCXR(1500, 32, seed=0, spurious={"finding": "Pneumothorax", "p": 0.9})
    k = finding_index("Pneumothorax")
    labels = ds.label_matrix()[:, k]
    markers = np.array([ds.has_marker(i) for i in range(len(ds))])
    assert abs((markers == (labels > 0.5)).mean() - 0.9) < 0.03
    i = int(np.flatnonzero(markers)[0])
    item = ds[i]
    assert not torch.isnan(item["spurious_box"]).any()
    with_marker, _, mbox = ds.render(i, marker=True)
    without, _, none_box = ds.render(i, marker=False)
    inside = box_mask(mbox, 32)
    diff = np.abs(with_marker - without)
    assert diff[~inside].max() == 0.0 and diff[inside].max() > 0.3
    assert np.isnan(none_box).all()


def test_tube_marker_stays_in_its_box():
    ds = SyntheticCXR(4, 64, seed=0, spurious={"finding": "Nodule", "p": 1.0, "kind": "tube"})
    img, _, box = ds.render(0, marker=True)
    ref, _, _ = ds.render(0, marker=False)
    diff = np.abs(img - ref)
    assert diff[~box_mask(box, 64)].max() == 0.0 and diff.max() > 0.3


@pytest.mark.parametrize(
    "spurious, message",
    [
        ({"finding": "Broken_Rib"}, "Broken_Rib"),
        ({"finding": "Nodule", "p": 1.5}, "spurious.p"),
        ({"finding": "Nodule", "kind": "sticker"}, "spurious.kind"),
        ({"findng": "Nodule"}, "unknown key"),
    ],
)
def test_bad_spurious_settings_are_named(spurious, message):
    with pytest.raises((ValueError, KeyError), match=message):
        SyntheticCXR(4, 32, spurious=spurious)


def test_bad_prevalence_is_named():
    with pytest.raises(ValueError, match="prevalence"):
        SyntheticCXR(4, 32, prevalence=1.5)
