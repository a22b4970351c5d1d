"""The data sources (synthetic, NIH, ChestMNIST) through the shared datamodule: batch shapes, dtypes, splits, boxes, augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nih_fixtures import make_chestmnist_root, make_nih_root

from causal_ie.data import DataError
from causal_ie.data.sources import ChestMNISTDataModule, NIHDataModule, SyntheticDataModule
from causal_ie.data.transforms import BoxAwareAugment

SMALL = {"num_train": 40, "num_val": 12, "num_test": 10}


def check_batch(batch: dict, size: int, n: int) -> None:
    assert batch["image"].shape == (n, 1, size, size) and batch["image"].dtype == torch.float32
    assert 0.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0
    assert batch["labels"].shape == (n, 14) and batch["labels"].dtype == torch.float32
    assert batch["boxes"].shape == (n, 14, 4) and batch["boxes"].dtype == torch.float32
    assert len(batch["id"]) == n and len(batch["patient_id"]) == n


def test_synthetic_batches_and_disjoint_splits():
    dm = SyntheticDataModule(image_size=32, batch_size=8, synthetic=SMALL, augment=False)
    dm.setup("fit")
    dm.setup("test")
    check_batch(next(iter(dm.train_dataloader())), 32, 8)
    batch = next(iter(dm.test_dataloader()))
    check_batch(batch, 32, 8)
    present = batch["labels"] > 0.5
    assert torch.equal(present, ~torch.isnan(batch["boxes"]).any(-1))
    images = {split: torch.stack([dm.dataset(split)[i]["image"] for i in range(10)]) for split in ("train", "val", "test")}
    assert not torch.equal(images["train"], images["val"]) and not torch.equal(images["val"], images["test"])
    assert len(dm.dataset("train")) == 40 and len(dm.dataset("val")) == 12 and len(dm.dataset("test")) == 10


def test_a_last_training_batch_of_one_image_is_dropped():
    """41 training images in batches of 8 would end in a batch of 1, which BatchNorm refuses in
    training mode: that image is left out of the epoch; 42 keeps its batch of 2, and val keeps all."""
    for n, sizes in ((41, [8] * 5), (42, [8] * 5 + [2])):
        dm = SyntheticDataModule(image_size=16, batch_size=8, synthetic=SMALL | {"num_train": n, "num_val": 9},
                                 augment=False)
        dm.setup("fit")
        assert [len(b["image"]) for b in dm.train_dataloader()] == sizes
        assert [len(b["image"]) for b in dm.val_dataloader()] == [8, 1]


def test_label_matrix_positive_weights_and_test_subset():
    dm = SyntheticDataModule(image_size=16, synthetic=SMALL, test_subset=4)
    labels = dm.label_matrix("train")
    assert labels.shape == (40, 14)
    pos = labels.sum(0)
    np.testing.assert_allclose(dm.positive_weights(), (40 - pos) / np.maximum(pos, 1))
    assert len(dm.dataset("test")) == 4
    assert dm.label_matrix("test").shape == (4, 14)
    np.testing.assert_array_equal(dm.label_matrix("test")[2], dm.dataset("test")[2]["labels"].numpy())


def test_training_augmentation_moves_boxes_with_the_image():
    torch.manual_seed(0)
    image = torch.zeros(1, 32, 32)
    image[:, 10:18, 6:12] = 1.0  # a bright rectangle with a known box
    boxes = torch.full((14, 4), float("nan"))
    boxes[4] = torch.tensor([6.0, 10.0, 6.0, 8.0])
    augment = BoxAwareAugment(translate=0.15, scale=(0.9, 1.1), degrees=0.0, hflip=0.5)
    for _ in range(10):
        out = augment({"image": image, "boxes": boxes.clone(), "labels": torch.zeros(14)})
        x, y, w, h = out["boxes"][4].tolist()
        bright = torch.nonzero(out["image"][0] > 0.5)
        rows, cols = bright[:, 0].float() + 0.5, bright[:, 1].float() + 0.5
        # every bright pixel centre lies in the moved box (1 px slack for resampling)
        assert (cols >= x - 1).all() and (cols <= x + w + 1).all()
        assert (rows >= y - 1).all() and (rows <= y + h + 1).all()
        assert torch.isnan(out["boxes"][0]).all()


def test_training_augmentation_moves_masks_with_the_image():
    """A flip (always) and an affine move the masks exactly as the image: the bright pixels and
    the mask stay the same set, and the boxes still hold them."""
    torch.manual_seed(0)
    image = torch.zeros(1, 32, 32)
    image[:, 10:18, 6:12] = 1.0
    masks = torch.zeros(14, 32, 32, dtype=torch.bool)
    masks[4, 10:18, 6:12] = True
    boxes = torch.full((14, 4), float("nan"))
    boxes[4] = torch.tensor([6.0, 10.0, 6.0, 8.0])
    flipped = BoxAwareAugment(translate=0.0, scale=(1.0, 1.0), degrees=0.0, hflip=1.0)(
        {"image": image, "masks": masks, "boxes": boxes.clone()})
    assert flipped["masks"].dtype == torch.bool and torch.equal(flipped["masks"][4], masks[4].flip(-1))
    assert torch.equal(flipped["image"][0] > 0.5, flipped["masks"][4]) and not flipped["masks"][0].any()
    assert flipped["boxes"][4].tolist() == [20.0, 10.0, 6.0, 8.0]
    augment = BoxAwareAugment(translate=0.15, scale=(0.9, 1.1), degrees=5.0, hflip=0.5)
    for _ in range(10):
        out = augment({"image": image, "masks": masks, "boxes": boxes.clone()})
        bright = out["image"][0] > 0.5
        # nearest-neighbour masks and bilinear images agree up to the pixels on the edge
        assert (bright ^ out["masks"][4]).sum() <= 0.3 * masks[4].sum()


def test_nih_source_scales_boxes_to_the_batch_image(tmp_path):
    root = make_nih_root(tmp_path, n_patients=8, images_per_patient=3, image_size=32, official_split=True)
    dm = NIHDataModule(root=str(root), image_size=16, batch_size=4, cache_dir=str(tmp_path / "cache"), augment=False)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    check_batch(batch, 16, min(4, len(dm.dataset("test"))))
    boxed = ~torch.isnan(batch["boxes"]).any(-1)
    if boxed.any():
        assert float(batch["boxes"][boxed].max()) <= 16.0


def test_chestmnist_source(tmp_path):
    root = make_chestmnist_root(tmp_path, size=28, n=(6, 3, 5))
    dm = ChestMNISTDataModule(root=str(root), image_size=24, batch_size=5, augment=False)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    check_batch(batch, 24, 5)
    assert torch.isnan(batch["boxes"]).all()  # ChestMNIST has no boxes


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(DataError, match="data.root is required for data=nih"):
        NIHDataModule()
    with pytest.raises(DataError, match="data.root is required for data=chestmnist"):
        ChestMNISTDataModule()
    with pytest.raises(ValueError, match="data.image_size"):
        SyntheticDataModule(image_size=4)
    with pytest.raises(ValueError, match="data.on_error"):
        SyntheticDataModule(on_error="ignore")
    with pytest.raises(ValueError, match="data.test_subset"):
        SyntheticDataModule(test_subset=0)
    with pytest.raises(DataError, match=str(tmp_path / "missing")):
        NIHDataModule(root=str(tmp_path / "missing"), image_size=16).setup("test")


def test_data_report_synthetic_and_chestmnist_counts(tmp_path):
    import json

    dm = SyntheticDataModule(image_size=16, synthetic=SMALL, test_subset=4)
    report = dm.data_report()
    assert report == {
        "source": "synthetic",
        "splits": {"train": {"images": 40}, "val": {"images": 12}, "test": {"images": 4, "images_before_subset": 10}},
    }
    assert dm.datasets == {}  # counting generates nothing
    root = make_chestmnist_root(tmp_path, size=28, n=(6, 3, 5))
    report = ChestMNISTDataModule(root=str(root), image_size=24).data_report()
    assert json.loads(json.dumps(report)) == report
    assert report["splits"] == {"train": {"images": 6}, "val": {"images": 3}, "test": {"images": 5}}


def test_nih_data_report_after_setup_is_the_same_read(tmp_path):
    root = make_nih_root(tmp_path, n_patients=8, images_per_patient=3, image_size=32, official_split=True)
    dm = NIHDataModule(root=str(root), image_size=16, cache_dir=str(tmp_path / "cache"), augment=False)
    dm.setup("fit")
    dm.setup("test")
    report = dm.data_report()
    assert (report["images_listed"], report["images_found"], report["images_used"], report["images_skipped"]) == (24, 24, 24, 0)
    assert report["skipped"] == {} and report["image_folders"] == ["images"]
    assert sum(s["images"] for s in report["splits"].values()) == 24
    assert report["splits"]["test"]["images"] == len(dm.dataset("test")) == 6
