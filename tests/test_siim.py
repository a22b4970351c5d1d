"""data=siim: SIIM-ACR's real run-length rows (torchxrayvision's shipped csv, ' EncodedPixels' with
its leading space) over 1024 px DICOMs written by the test; masks, labels, bad files, and
train.py + evaluate.py end to end with localisation scored on the segmentations."""

from __future__ import annotations


import pytest
import torch
from conftest import train_then_evaluate
from dicom_fixtures import source_datamodule, train_item

from causal_ie.data import DataError

pytest.importorskip("torchxrayvision")
pytest.importorskip("pydicom")

from siim_fixtures import make_siim_root, pick_images, shipped_rows  # noqa: E402

from causal_ie.data.sources import SIIMDataModule  # noqa: E402


@pytest.fixture(scope="module")
def rows():
    return shipped_rows()


def datamodule(root, tmp_path, **kw):
    return source_datamodule(SIIMDataModule, root, tmp_path, **kw)


item_of = train_item


def runs(encoding: str) -> set[int]:
    """The flat (column-major) pixel indices of one run-length string, counted out one by one."""
    numbers, pixels, position = [int(v) for v in encoding.split()], set(), 0
    for start, length in zip(numbers[0::2], numbers[1::2]):
        position += start
        pixels.update(range(position, position + length))
        position += length
    return pixels


def test_an_images_components_unite_into_its_mask(tmp_path, rows):
    """At 1024 px (the DICOMs' own size) an image's mask holds exactly the union of its rows'
    runs, counted out pixel by pixel (runs go down the columns: flat index i is row i % 1024 of
    column i // 1024). The real rows of a 3-component image overlap (2,580 pixels of its first
    two): a sum of run lengths would overcount."""
    three, one, none = pick_images(rows, [3, 1], 1)
    root = make_siim_root(tmp_path, [three, one, none], rows=rows)
    dm = datamodule(root, tmp_path, image_size=1024)
    for image_id in (three, one):
        union = set().union(*(runs(e) for e in rows.loc[rows["ImageId"] == image_id, " EncodedPixels"]))
        item = item_of(dm, image_id)
        assert item["labels"].tolist() == [1.0]
        marked = set(torch.nonzero(item["masks"][0].T.flatten()).flatten().tolist())
        assert marked == union
    encodings = rows.loc[rows["ImageId"] == three, " EncodedPixels"].tolist()
    assert len(encodings) == 3 and sum(len(runs(e)) for e in encodings) > len(set().union(*map(runs, encodings)))
    empty = item_of(dm, none)
    assert empty["labels"].tolist() == [0.0] and not empty["masks"].any() and torch.isnan(empty["boxes"]).all()


def test_masks_resize_to_the_batch_and_columns_are_named(tmp_path, rows):
    """At 64 px each target pixel takes the 1024 px pixel under its centre: pixel (r, c) is the
    stored pixel (16 r + 8, 16 c + 8)."""
    (one,) = pick_images(rows, [1], 0)
    root = make_siim_root(tmp_path, [one], rows=rows)
    full = item_of(datamodule(root, tmp_path, image_size=1024), one)["masks"][0]
    small = item_of(datamodule(root, tmp_path, image_size=64), one)["masks"][0]
    assert torch.equal(small, full[8::16, 8::16])
    # the stage-2 spelling without the space is read too; a file with neither is refused by name
    (root / "train-rle.csv").write_text((root / "train-rle.csv").read_text().replace(" EncodedPixels", "EncodedPixels", 1))
    assert torch.equal(item_of(datamodule(root, tmp_path, image_size=64), one)["masks"][0], small)
    (root / "train-rle.csv").write_text("ImageId,Pixels\nx,-1\n")
    with pytest.raises(DataError, match="needs the columns ImageId and ' EncodedPixels'"):
        datamodule(root, tmp_path)


def test_missing_dicoms_are_named_or_skipped(tmp_path, rows):
    ids = pick_images(rows, [1, 2], 2)
    root = make_siim_root(tmp_path, ids, rows=rows, missing=[ids[0]])
    with pytest.raises(DataError, match=f"missing image.*{ids[0]}.dcm"):
        datamodule(root, tmp_path).setup("fit")
    report = datamodule(root, tmp_path, on_error="skip").data_report()
    assert (report["images_listed"], report["images_found"], report["images_used"]) == (4, 3, 3)
    assert report["skipped"] == {"missing image": 1} and report["source"] == "siim"


def test_train_and_evaluate_on_siim_score_the_segmentations(tmp_path, rows):
    from causal_ie.outputs.schema import EVALUATION, problems

    root = make_siim_root(tmp_path, pick_images(rows, [1, 1, 2, 1, 3, 1, 2, 1, 4, 1], 6), rows=rows)
    saved, datamodule = train_then_evaluate(tmp_path, "siim", root, "data.test_fraction=0.4")
    assert problems(saved, EVALUATION) == []
    assert saved["run"]["data"]["source"] == "siim" and datamodule.findings == ("Pneumothorax",)
    test = datamodule.dataset("test")
    items = [test[i] for i in range(len(test))]
    expected = sum(int(it["masks"][0].any()) for it in items)
    assert expected == len(items) > 0  # data.test_boxes_only (evaluate.yaml): images with a segmentation
    for method in ("ce", "gradcam"):
        assert saved["localisation"][method]["pairs"] == saved["localisation_pairs"] == expected


def test_a_single_label_auroc_is_per_label_like_the_multilabel_one():
    """Scores 0.1, 0.4, 0.35, 0.8 for targets 0, 0, 1, 1: of the 4 (positive, negative) pairs the
    positive ranks higher in 3, AUROC 0.75; as [1] through per_label, as MultilabelAUROC gives [K]."""
    from causal_ie.models.auroc import label_auroc, per_label

    metric = label_auroc(1)
    metric.update(torch.tensor([[0.1], [0.4], [0.35], [0.8]]), torch.tensor([[0], [0], [1], [1]]))
    assert per_label(metric.compute()).tolist() == [pytest.approx(0.75)]
    two = label_auroc(2)
    two.update(torch.tensor([[0.1, 0.1], [0.4, 0.4], [0.35, 0.35], [0.8, 0.8]]), torch.tensor([[0, 0], [0, 0], [1, 1], [1, 1]]))
    assert per_label(two.compute()).tolist() == [pytest.approx(0.75)] * 2
