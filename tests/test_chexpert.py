"""data=chexpert: CheXpert's real training rows (torchxrayvision's shipped train.csv) over written
JPEGs; uncertain labels by policy, blank as negative, No Finding, views, the official test split,
partial folders, and train.py + evaluate.py end to end with uncertain labels left out."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import train_then_evaluate

from causal_ie.data import NIH14, DataError
from causal_ie.labels import align

pytest.importorskip("torchxrayvision")

from chexpert_fixtures import RELEASE, make_chexpert_root, shipped_rows, valid_rows  # noqa: E402

from causal_ie.data.sources import CheXpertDataModule  # noqa: E402

HEALTHY = f"{RELEASE}/train/patient00001/study1/view1_frontal.jpg"  # No Finding 1, Support Devices 1
# Cardiomegaly, Edema, Consolidation, Atelectasis, Pleural Effusion -1; Fracture, Lung Opacity 1; the rest blank
UNSURE = f"{RELEASE}/train/patient00002/study2/view1_frontal.jpg"
LATERAL = f"{RELEASE}/train/patient00002/study1/view2_lateral.jpg"


@pytest.fixture(scope="module")
def rows():
    return shipped_rows()


def datamodule(root, tmp_path, **kw):
    settings = dict(root=str(root), image_size=32, batch_size=4, augment=False, cache_dir=str(tmp_path / "cache"),
                    val_fraction=0.0, test_fraction=0.0)
    return CheXpertDataModule(**(settings | kw))


def labels_of(dm, path):
    ds = dm.dataset("train")
    return dict(zip(dm.labels.names, ds[ds.ids.index(path)]["labels"].tolist()))


def test_uncertain_labels_follow_the_policy_and_blank_is_negative(tmp_path, rows):
    root = make_chexpert_root(tmp_path, rows.head(12))
    for policy, unsure in (("ignore", None), ("ones", 1.0), ("zeros", 0.0)):
        dm = datamodule(root.parent, tmp_path, uncertain=policy)  # the folder holding the release works too
        got = labels_of(dm, UNSURE)
        for name in ("Cardiomegaly", "Consolidation", "Effusion", "Edema", "Atelectasis"):  # Effusion is the CSV's Pleural Effusion
            assert (math.isnan(got[name]) if unsure is None else got[name] == unsure), (policy, name)
        assert got["Fracture"] == got["Lung Opacity"] == 1.0
        assert got["Pneumothorax"] == got["Pneumonia"] == 0.0  # blank: not mentioned, negative
        assert dm.data_report()["uncertain_labels"] == int((rows.head(12)[["Cardiomegaly", "Consolidation",
            "Pleural Effusion", "Edema", "Lung Opacity", "Atelectasis", "Pneumonia", "Pneumothorax", "Fracture",
            "Support Devices", "Enlarged Cardiomediastinum", "Lung Lesion", "Pleural Other"]]
            [rows.head(12)["Frontal/Lateral"] == "Frontal"] == -1).sum().sum())
    healthy = labels_of(datamodule(root, tmp_path), HEALTHY)
    assert healthy.pop("Support Devices") == 1.0 and set(healthy.values()) == {0.0}
    assert align(dm.labels, NIH14).data_only == ("Enlarged Cardiomediastinum", "Fracture", "Lung Lesion",
                                                  "Lung Opacity", "Pleural Other", "Support Devices")
    with pytest.raises(ValueError, match="data.uncertain='maybe'"):
        CheXpertDataModule(root=str(root), uncertain="maybe")


def test_views_and_the_official_test_split(tmp_path, rows):
    root = make_chexpert_root(tmp_path, rows.head(40), valid_rows(rows, 6))
    dm = datamodule(root, tmp_path, val_fraction=0.25)
    report = dm.data_report()
    test, train, val = (dm.dataset(s) for s in ("test", "train", "val"))
    assert [p.split("/")[2] for p in test.ids] == [f"patient{64541 + i}" for i in range(6)]  # valid.csv, in order
    assert not torch.isnan(torch.stack([test[i]["labels"] for i in range(len(test))])).any()
    assert not set(train.patient_ids) & set(val.patient_ids)  # patient-wise
    frontal = int((rows.head(40)["Frontal/Lateral"] == "Frontal").sum())
    assert len(train) + len(val) == frontal and LATERAL not in train.ids + val.ids
    assert report["split"].startswith("test: valid.csv (official)") and report["views"] == ["PA", "AP"]
    assert len(datamodule(root, tmp_path, views=["L"]).dataset("train")) == 40 - frontal
    image = train[0]["image"]
    assert image.shape == (1, 32, 32) and float(image[0, 0, 0]) < 0.2 < 0.8 < float(image[0, -1, 0])


def test_partial_folder_and_bad_files_are_named(tmp_path, rows):
    train = rows.head(12)
    root = make_chexpert_root(tmp_path, train, missing=(UNSURE,))
    with pytest.raises(DataError, match="missing image.*patient00002/study2/view1_frontal.jpg.*data.on_error=skip"):
        datamodule(root, tmp_path).data_report()
    report = datamodule(root, tmp_path, on_error="skip").data_report()
    assert report["skipped"] == {"missing image": 1} and report["images_used"] == report["images_listed"] - 1
    train.drop(columns=["AP/PA"]).to_csv(root / "train.csv", index=False)
    with pytest.raises(DataError, match=r"train.csv lacks column\(s\) AP/PA"):
        datamodule(root, tmp_path)
    with pytest.raises(DataError, match="no CheXpert train.csv"):
        CheXpertDataModule(root=str(tmp_path / "cache"))


def test_train_and_evaluate_on_chexpert_leave_uncertain_labels_out(tmp_path, rows):
    """train.py and evaluate.py with data=chexpert: the training rows carry uncertain labels
    (NaN under ignore) and the loss stays finite; valid.csv is the test split, every image
    scored for classification (no ground truth, so data.test_boxes_only has no effect)."""
    from causal_ie.outputs.schema import EVALUATION, problems

    root = make_chexpert_root(tmp_path, rows.head(60), valid_rows(rows, 12))
    saved, dm = train_then_evaluate(tmp_path, "chexpert", root, "data.val_fraction=0.2")
    assert problems(saved, EVALUATION) == []
    data = saved["run"]["data"]
    assert data["source"] == "chexpert" and data["uncertain"] == "ignore" and data["uncertain_labels"] > 0
    assert data["splits"]["test"]["images"] == 12 and data["boxes_only"] == []
    assert saved["localisation_pairs"] == 0
    train = dm.dataset("train")
    assert torch.isnan(torch.stack([train[i]["labels"] for i in range(len(train))])).any()
    scored = {k: v for k, v in saved["classification"]["auroc"].items() if not k.endswith(("_ci_low", "_ci_high"))}
    assert any(np.isfinite(v) for v in scored.values())
    assert np.isfinite(saved["classification"]["auroc_mean"])
