"""data=nih_google: Google's radiologist-adjudicated NIH labels (torchxrayvision's shipped rows)
over written 1024 px PNGs; labels from Google's columns, the official test set, folders, and
train.py + evaluate.py end to end."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import train_then_evaluate

from causal_ie.data import NIH14, DataError
from causal_ie.labels import align

pytest.importorskip("torchxrayvision")

from nih_google_fixtures import make_google_root, pick_rows, shipped_rows  # noqa: E402

from causal_ie.data.sources import NIHGoogleDataModule  # noqa: E402

OPACITY = "00000013_008.png"  # Google: Airspace opacity YES, the rest NO; NIH's Finding Labels: No Finding


@pytest.fixture(scope="module")
def rows():
    return shipped_rows()


def datamodule(root, labels, tmp_path, **kw):
    settings = dict(root=str(root), labels_file=str(labels), image_size=32, batch_size=4, augment=False,
                    cache_dir=str(tmp_path / "cache"), val_fraction=0.0)
    return NIHGoogleDataModule(**(settings | kw))


def test_labels_are_googles_not_nihs(tmp_path, rows):
    chosen = pick_rows(rows, 6)
    root, labels = make_google_root(tmp_path, chosen)
    dm = datamodule(root, labels, tmp_path)
    assert dm.labels.names == ("Lung Opacity", "Fracture", "Nodule/Mass", "Pneumothorax")
    test = dm.dataset("test")  # OPACITY is in Google's test set
    assert rows.set_index("Image Index").loc[OPACITY, "Finding Labels"] == "No Finding"
    got = dict(zip(dm.labels.names, test[test.ids.index(OPACITY)]["labels"].tolist()))
    assert got == {"Lung Opacity": 1.0, "Fracture": 0.0, "Nodule/Mass": 0.0, "Pneumothorax": 0.0}
    for ds in (test, dm.dataset("train")):  # every image: YES is 1, NO is 0, column by column
        for i, name in enumerate(ds.ids):
            row = chosen.set_index("Image Index").loc[name]
            expected = [float(row[c] == "YES") for c in ("Airspace opacity", "Fracture", "Nodule or mass", "Pneumothorax")]
            assert ds[i]["labels"].tolist() == expected, name
    assert (chosen[["Fracture", "Pneumothorax", "Airspace opacity", "Nodule or mass"]] == "YES").any().sum() >= 2
    column = dict(zip(NIH14.names, align(dm.labels, NIH14).columns))
    assert column["Nodule"] == column["Mass"] == (2,) and column["Pneumothorax"] == (3,)


def test_googles_test_set_is_the_test_split(tmp_path, rows):
    chosen = pd.concat([pick_rows(rows, 10), rows[rows["View Position"] == "PA"].head(4)]).drop_duplicates("Image Index")
    root, labels = make_google_root(tmp_path, chosen, layout="tarball")
    dm = datamodule(root, labels, tmp_path, val_fraction=0.3)
    test, train, val = (dm.dataset(s) for s in ("test", "train", "val"))
    assert test.ids == chosen[chosen["Set Id"] == "test"]["Image Index"].tolist()
    assert sorted(train.ids + val.ids) == sorted(chosen[chosen["Set Id"] == "val"]["Image Index"])
    assert not set(train.patient_ids) & set(val.patient_ids) and len(val) > 0
    report = dm.data_report()
    assert report["split"].startswith("test: Google's test set") and report["metadata_file"] == str(labels)
    pa = datamodule(root, labels, tmp_path, views=["PA"])
    assert sorted(pa.dataset("train").ids + pa.dataset("test").ids) == sorted(
        chosen[chosen["View Position"] == "PA"]["Image Index"])


def test_the_shipped_labels_and_bad_input(tmp_path, rows):
    chosen = pick_rows(rows, 4)
    root, labels = make_google_root(tmp_path, chosen, missing=[OPACITY])
    with pytest.raises(DataError, match=f"missing image.*{OPACITY}.*data.on_error=skip"):
        datamodule(root, labels, tmp_path).data_report()
    shipped = datamodule(root, labels, tmp_path, labels_file=None, on_error="skip", views=["*"]).data_report()
    assert shipped["images_listed"] == len(rows) == 4376 and shipped["images_used"] == 7
    chosen.drop(columns=["Set Id"]).to_csv(labels, index=False)
    with pytest.raises(DataError, match="lacks column\\(s\\) Set Id"):
        datamodule(root, labels, tmp_path)
    with pytest.raises(DataError, match="data.labels_file=.*no such file"):
        datamodule(root, tmp_path / "nowhere.csv", tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        datamodule(tmp_path / "nowhere", labels, tmp_path)


def test_train_and_evaluate_on_nih_google(tmp_path, rows):
    from causal_ie.outputs.schema import EVALUATION, problems

    chosen = pick_rows(rows, 20)
    root, labels = make_google_root(tmp_path, chosen)
    # the first val-set rows hold 8 images of patient 179: at val_fraction 0.2 the greedy
    # patient-wise split gives val none of these 20 (a DataError names the empty split)
    saved, dm = train_then_evaluate(tmp_path, "nih_google", root, f"data.labels_file={labels}", "data.val_fraction=0.4")
    assert problems(saved, EVALUATION) == []
    assert saved["run"]["data"]["source"] == "nih_google" and saved["run"]["data"]["splits"]["test"]["images"] == 20
    assert saved["localisation_pairs"] == 0 and np.isfinite(saved["classification"]["auroc_mean"])
