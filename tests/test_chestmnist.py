"""ChestMNIST npz reading and the sample dicts it yields."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nih_fixtures import make_chestmnist_root

from causal_ie.data.chestmnist import ChestMNISTDataset, read_chestmnist
from causal_ie.data.errors import DataError
from causal_ie.data.images import resize_uint8


@pytest.mark.parametrize("size, filename", [(28, None), (28, "chestmnist_28.npz"), (64, None)])
def test_read_chestmnist_splits(tmp_path, size, filename):
    root = make_chestmnist_root(tmp_path, size=size, n=(5, 2, 3), filename=filename)
    splits = read_chestmnist(root, size=size)
    assert list(splits) == ["train", "val", "test"]
    with np.load(next(root.iterdir())) as raw:
        for split, n in zip(splits, (5, 2, 3), strict=True):
            images, labels = splits[split]
            assert images.shape == (n, size, size) and images.dtype == np.uint8
            assert labels.shape == (n, 14) and np.issubdtype(labels.dtype, np.integer)
            np.testing.assert_array_equal(images, raw[f"{split}_images"])
            np.testing.assert_array_equal(labels, raw[f"{split}_labels"])


def test_read_chestmnist_errors(tmp_path):
    with pytest.raises(DataError, match=r"sizes 28, 64, 128, 224.*32"):
        read_chestmnist(tmp_path, size=32)
    with pytest.raises(DataError, match=r"does not exist"):
        read_chestmnist(tmp_path / "none", size=28)
    root = make_chestmnist_root(tmp_path, size=28, n=(3, 2, 2))
    with pytest.raises(DataError, match=r"chestmnist_64\.npz"):
        read_chestmnist(root, size=64)
    path = root / "chestmnist.npz"
    with np.load(path) as raw:
        arrays = {k: raw[k] for k in raw.files if k != "val_labels"}
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=r"chestmnist\.npz: missing key\(s\) val_labels"):
        read_chestmnist(root, size=28)
    arrays["val_labels"] = np.zeros((2, 13), np.uint8)
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=r"val_labels must be \[2, 14\]"):
        read_chestmnist(root, size=28)["val"]
    path.write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"cannot read the ChestMNIST file .*chestmnist\.npz"):
        read_chestmnist(root, size=28)


def test_chestmnist_dataset_items(tmp_path):
    root = make_chestmnist_root(tmp_path, size=28, n=(4, 2, 3))
    images, labels = read_chestmnist(root, size=28)["test"]
    ds = ChestMNISTDataset(images, labels, image_size=32, split="test")
    assert len(ds) == 3
    item = ds[2]
    assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
    np.testing.assert_allclose(item["image"][0].numpy(), resize_uint8(images[2], 32) / 255.0, atol=1e-7)
    assert torch.equal(item["labels"], torch.tensor(labels[2], dtype=torch.float32))
    assert item["boxes"].shape == (14, 4) and torch.isnan(item["boxes"]).all()
    assert item["id"] == "chestmnist_test_2" and item["patient_id"] == ""
    same = ChestMNISTDataset(images, labels, image_size=28, split="test")[0]
    np.testing.assert_allclose(same["image"][0].numpy(), images[0] / 255.0, atol=1e-7)
    with pytest.raises(IndexError):
        ds[3]
