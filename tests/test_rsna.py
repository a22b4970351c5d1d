"""data=rsna: RSNA Pneumonia's real label rows (torchxrayvision's shipped stage-2 file) over
1024 px JPEG baseline DICOMs; labels, views, box masks, partial folders, and train.py +
evaluate.py end to end with localisation scored on the opacity boxes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import train_then_evaluate
from dicom_fixtures import source_datamodule, train_item

from causal_ie.data import NIH14, DataError
from causal_ie.labels import align

pytest.importorskip("torchxrayvision")
pytest.importorskip("pydicom")

from rsna_fixtures import make_rsna_root, pick_images, shipped_rows  # noqa: E402

from causal_ie.data.sources import RSNADataModule  # noqa: E402

TWO_BOXES = "00436515-870c-4b36-a041-de91049b9ab4"  # AP; boxes (264, 152, 213, 379) and (562, 152, 256, 453)
NEGATIVE = "0004cfab-14fd-4e49-80ba-63a80b6bddd6"  # PA, Target 0


@pytest.fixture(scope="module")
def rows():
    return shipped_rows()


def datamodule(root, tmp_path, **kw):
    return source_datamodule(RSNADataModule, root, tmp_path, **kw)


def test_labels_come_from_target_and_align_by_name(tmp_path, rows):
    root = make_rsna_root(tmp_path, [TWO_BOXES, NEGATIVE], rows=rows)
    dm = datamodule(root, tmp_path)
    assert dm.labels.names == ("Lung Opacity", "Pneumonia")
    assert train_item(dm, TWO_BOXES)["labels"].tolist() == [1.0, 1.0]
    assert train_item(dm, NEGATIVE)["labels"].tolist() == [0.0, 0.0]
    alignment = align(dm.labels, NIH14)
    column = dict(zip(NIH14.names, alignment.columns))
    assert column["Pneumonia"] == (dm.labels.index("Pneumonia"),) and column["Consolidation"] == ()
    assert alignment.data_only == ("Lung Opacity",)


def test_box_masks_are_hand_computed_at_64_px(tmp_path, rows):
    """1024 px -> 64 px scales by 1/16 both ways; a pixel is in when its centre is. Box (264, 152,
    213, 379): columns 16.5..29.81 -> 16..29, rows 9.5..33.19 -> 9..32. Box (562, 152, 256, 453):
    columns 35.13..51.13 -> 35..50, rows 9.5..37.81 -> 9..37. Both labels get the union."""
    root = make_rsna_root(tmp_path, [TWO_BOXES, NEGATIVE], rows=rows)
    item = train_item(datamodule(root, tmp_path), TWO_BOXES)
    expected = torch.zeros(64, 64, dtype=torch.bool)
    expected[9:33, 16:30] = True
    expected[9:38, 35:51] = True
    assert torch.equal(item["masks"][0], expected) and torch.equal(item["masks"][1], expected)
    assert item["boxes"][0].tolist() == [16.0, 9.0, 35.0, 29.0]  # the masks' bounding box
    negative = train_item(datamodule(root, tmp_path), NEGATIVE)
    assert not negative["masks"].any() and torch.isnan(negative["boxes"]).all()
    # pixels: the 8-bit ramp 40..160 in [0, 1], the boxes at 230
    image = item["image"][0]
    assert abs(float(image[0, 0]) - 40 / 255) < 0.02 and abs(float(image[-1, 0]) - 160 / 255) < 0.02
    assert abs(float(image[20, 20]) - 230 / 255) < 0.03


def test_a_box_past_its_dicom_is_reported(tmp_path, rows):
    """On a DICOM stored at 512 px, the second box (ending at column 818) lies outside: the boxes
    are scaled by the stored size, so a file of another size is caught, not silently stretched."""
    root = make_rsna_root(tmp_path, [TWO_BOXES, NEGATIVE], rows=rows, size=512)
    with pytest.raises(DataError, match=f"box outside its image.*{TWO_BOXES}.*512 x 512"):
        datamodule(root, tmp_path).data_report()


def test_views_are_torchxrayvisions_and_counted(tmp_path, rows):
    ids = pick_images(rows, [1, 2, 3], 3)  # views PA, AP, AP, PA, PA, AP (the shipped headers table)
    root = make_rsna_root(tmp_path, ids, rows=rows)
    dm = datamodule(root, tmp_path, views=["PA"])
    report = dm.data_report()
    assert report["images_listed"] == 3 and report["images_other_views"] == 3 and report["views"] == ["PA"]
    assert set(dm.dataset("train").ids) == {ids[0], ids[3], ids[4]}
    assert len(datamodule(root, tmp_path).dataset("train")) == 6
    with pytest.raises(ValueError, match=r"data.views=\['LL'\]"):
        RSNADataModule(root=str(root), views=["LL"])


def test_partial_folder_and_bad_files_are_named(tmp_path, rows):
    ids = pick_images(rows, [1, 2], 3)
    root = make_rsna_root(tmp_path, ids, rows=rows, missing=[ids[1]])
    with pytest.raises(DataError, match=f"missing image.*{ids[1]}.dcm.*data.on_error=skip"):
        datamodule(root, tmp_path).data_report()
    dm = datamodule(root, tmp_path, on_error="skip")
    report = dm.data_report()
    assert (report["images_listed"], report["images_found"], report["images_used"]) == (5, 4, 4)
    assert report["skipped"] == {"missing image": 1}
    labels = root / "stage_2_train_labels.csv"
    table = pd.read_csv(labels)
    table.loc[0, "Target"] = 2
    table.to_csv(labels, index=False)
    with pytest.raises(DataError, match="stage_2_train_labels.csv line 2: image .* needs a Target of 0 or 1"):
        datamodule(root, tmp_path)
    labels.write_text("patientId,Target\nabc,0\n")
    with pytest.raises(DataError, match=r"lacks column\(s\) x, y, width, height"):
        datamodule(root, tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        RSNADataModule(root=str(tmp_path / "nowhere"))


def test_train_and_evaluate_on_rsna_score_the_opacity_boxes(tmp_path, rows):
    from causal_ie.outputs.schema import EVALUATION, problems

    root = make_rsna_root(tmp_path, pick_images(rows, [1, 2, 1, 2, 3, 1, 2, 4], 8), rows=rows)
    saved, dm = train_then_evaluate(tmp_path, "rsna", root, "data.test_fraction=0.4")
    assert problems(saved, EVALUATION) == []
    assert saved["run"]["data"]["source"] == "rsna" and saved["run"]["data"]["views"] == ["PA", "AP"]
    test = dm.dataset("test")
    items = [test[i] for i in range(len(test))]
    assert items and all(bool(it["masks"].any()) for it in items)  # data.test_boxes_only (evaluate.yaml)
    expected = sum(int(((it["labels"] > 0.5) & it["masks"].flatten(1).any(1)).sum()) for it in items)
    assert saved["localisation_pairs"] == expected > 0
    for method in ("ce", "gradcam"):
        assert saved["localisation"][method]["pairs"] == expected
        assert np.isfinite(saved["localisation"][method]["pointing_game"])


def test_training_items_carry_ground_truth_only_when_asked(tmp_path, rows):
    """data.train_masks=false (the default): training items have no masks to draw (training does
    not use them); val and test do. With true, the augmented training batches carry them."""
    root = make_rsna_root(tmp_path, pick_images(rows, [1, 2, 3, 1], 4), rows=rows)
    dm = datamodule(root, tmp_path, train_masks=False, val_fraction=0.25, test_fraction=0.25)
    assert "masks" not in dm.dataset("train")[0] and "boxes" not in dm.dataset("train")[0]
    assert all("masks" in dm.dataset(s)[0] for s in ("val", "test"))
    dm = datamodule(root, tmp_path, train_masks=True, augment=True, augment_hflip=0.5)
    batch = next(iter(dm.train_dataloader()))
    assert batch["masks"].shape == (4, 2, 64, 64) and batch["masks"].dtype == torch.bool
