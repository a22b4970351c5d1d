"""data=vindr: VinDr-CXR's real annotation rows (torchxrayvision's shipped train.csv) over DICOMs
written at non-square VinDr sizes; labels, masks, photometric handling, partial folders, and
train.py + evaluate.py end to end with localisation scored on the readers' masks."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from conftest import train_then_evaluate
from dicom_fixtures import source_datamodule, train_item

from causal_ie.data import NIH14, DataError
from causal_ie.labels import align

pytest.importorskip("torchxrayvision")
pytest.importorskip("pydicom")

from vindr_fixtures import make_vindr_root, pick_images, shipped_rows  # noqa: E402

from causal_ie.data.sources import VinDrDataModule  # noqa: E402

CARDIO = "9a5094b2563a1ef3ff50dc5c7ff71345"  # 3 readers' Cardiomegaly boxes, see test_masks_...
INVERTED = "051132a778e61a86eb147c7c6f564dfe"  # second image of the folder: MONOCHROME1, 14-bit


@pytest.fixture(scope="module")
def rows():
    return shipped_rows()


def datamodule(root, tmp_path, **kw):
    return source_datamodule(VinDrDataModule, root, tmp_path, **kw)


item_of = train_item


def test_labels_are_read_from_class_name(tmp_path, rows):
    """9a5094b2...'s rows name Cardiomegaly (3 readers), Pleural effusion, Pleural thickening and
    Aortic enlargement: exactly those 4 labels are present (under torchxrayvision's names)."""
    root = make_vindr_root(tmp_path, [CARDIO, INVERTED], rows=rows)
    dm = datamodule(root, tmp_path)
    labels = item_of(dm, CARDIO)["labels"]
    present = {dm.labels.names[k] for k in torch.nonzero(labels).flatten().tolist()}
    assert present == {"Cardiomegaly", "Effusion", "Pleural_Thickening", "Aortic enlargement"}
    # aligned to NIH's 14 by name: Nodule/Mass annotates both Nodule and Mass, Pleural effusion is Effusion
    alignment = align(dm.labels, NIH14)
    column = dict(zip(NIH14.names, alignment.columns))
    assert column["Nodule"] == column["Mass"] == (dm.labels.index("Nodule/Mass"),)
    assert column["Effusion"] == (dm.labels.index("Effusion"),) and column["Hernia"] == ()


def test_masks_scale_by_each_dicoms_own_rows_and_columns(tmp_path, rows):
    """Cardiomegaly of 9a5094b2... on a DICOM of 2,880 rows x 2,304 columns, at 64 px: columns
    scale by 64/2304, rows by 64/2880. R10 (691, 1375, 1653, 1831): columns 19..45, rows 31..40;
    R9 (692, 1375, 1657, 1799): columns 19..45, rows 31..39; R8 (689, 1313, 1666, 1763): columns
    19..45, rows 29..38 (a pixel is in when its centre is). Union: rows 29..40; at least 2 of 3
    readers: rows 31..39."""
    root = make_vindr_root(tmp_path, [CARDIO, INVERTED], rows=rows, sizes={CARDIO: (2304, 2880)})
    expected_any = torch.zeros(64, 64, dtype=torch.bool)
    expected_any[29:41, 19:46] = True
    expected_majority = torch.zeros(64, 64, dtype=torch.bool)
    expected_majority[31:40, 19:46] = True
    for readers, expected in (("any", expected_any), ("majority", expected_majority)):
        dm = datamodule(root, tmp_path, readers=readers)
        item = item_of(dm, CARDIO)
        k = dm.labels.index("Cardiomegaly")
        assert torch.equal(item["masks"][k], expected), readers
        rows_, cols_ = torch.nonzero(expected, as_tuple=True)
        assert item["boxes"][k].tolist() == [19.0, float(rows_.min()), 27.0, float(rows_.max() - rows_.min() + 1)]
        assert not item["masks"][dm.labels.index("Pneumothorax")].any()
        assert torch.isnan(item["boxes"][dm.labels.index("Pneumothorax")]).all()
    # the same boxes on a square DICOM of 2,880 px land elsewhere: the stored size is what scales
    square = make_vindr_root(tmp_path / "square", [CARDIO, INVERTED], rows=rows, sizes={CARDIO: (2880, 2880)})
    item = item_of(datamodule(square, tmp_path / "square"), CARDIO)
    assert not torch.equal(item["masks"][dm.labels.index("Cardiomegaly")], expected_any)


def test_monochrome1_is_inverted_and_pixels_are_in_0_1(tmp_path, rows):
    """The fixture's images are a ramp from 0.2 (top) to 0.6 (bottom) with 0.95 inside the first
    box; INVERTED stores them inverted as MONOCHROME1 at 14 bits: read back, it is the ramp again."""
    root = make_vindr_root(tmp_path, [CARDIO, INVERTED], rows=rows)
    dm = datamodule(root, tmp_path)
    for image_id in (CARDIO, INVERTED):
        image = item_of(dm, image_id)["image"][0]
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert abs(float(image[0].mean()) - 0.2) < 0.02 and abs(float(image[-1].mean()) - 0.6) < 0.02, image_id
        assert float(image.max()) > 0.9  # the bright box


def test_partial_folder_and_bad_files_are_named(tmp_path, rows):
    ids = pick_images(rows, 4, 2)
    root = make_vindr_root(tmp_path, ids, rows=rows, missing=[ids[1]])
    with pytest.raises(DataError, match=f"missing image.*{ids[1]}.dicom.*data.on_error=skip"):
        datamodule(root, tmp_path).setup("fit")
    dm = datamodule(root, tmp_path, on_error="skip", val_fraction=0.2, test_fraction=0.2)
    dm.setup("fit")
    report = dm.data_report()
    assert (report["images_listed"], report["images_found"], report["images_used"]) == (6, 5, 5)
    assert report["skipped"] == {"missing image": 1}
    assert sum(s["images"] for s in report["splits"].values()) == 5
    # a file without the box columns is refused by name
    (root / "train.csv").write_text("image_id,class_name,rad_id\nabc,No finding,R1\n")
    with pytest.raises(DataError, match=r"train.csv lacks column\(s\) x_min, y_min, x_max, y_max"):
        datamodule(root, tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        VinDrDataModule(root=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="data.readers='all'"):
        VinDrDataModule(root=str(root), readers="all")


def test_train_and_evaluate_on_vindr_score_the_readers_masks(tmp_path, rows):
    """train.py and evaluate.py with data=vindr: the model learns VinDr's 14 labels, and the
    localisation pairs are the test images' present labels with a non-empty mask."""
    from causal_ie.outputs.schema import EVALUATION, problems

    root = make_vindr_root(tmp_path, pick_images(rows, 14, 2), rows=rows)
    saved, datamodule = train_then_evaluate(tmp_path, "vindr", root, "data.test_fraction=0.4")
    assert problems(saved, EVALUATION) == []
    assert saved["run"]["data"]["source"] == "vindr" and saved["run"]["data"]["readers"] == "any"
    assert set(datamodule.findings) == set(datamodule.labels.names)
    test = datamodule.dataset("test")
    items = [test[i] for i in range(len(test))]
    assert all(int(it["masks"].flatten(1).any(1).sum()) > 0 for it in items)  # data.test_boxes_only (evaluate.yaml)
    expected = sum(int(((it["labels"] > 0.5) & it["masks"].flatten(1).any(1)).sum()) for it in items)
    assert saved["localisation_pairs"] == expected > 0
    for method in ("ce", "gradcam"):
        assert saved["localisation"][method]["pairs"] == expected
        assert np.isfinite(saved["localisation"][method]["pointing_game"])
