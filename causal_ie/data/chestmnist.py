"""ChestMNIST: the MedMNIST ``chestmnist_{28,64,128,224}.npz`` files of the 14 NIH findings."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from causal_ie.data.errors import DataError
from causal_ie.data.findings import NUM_FINDINGS
from causal_ie.data.images import resize_uint8

SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")


def chestmnist_file(root: str | Path, size: int = 64) -> Path:
    """The npz of ``size`` in the folder ``root`` (``root`` may also be the npz itself)."""
    if int(size) not in SIZES:
        raise DataError(f"ChestMNIST comes in sizes {', '.join(map(str, SIZES))}; got data.chestmnist_size={size}")
    root = Path(root).expanduser()
    if root.is_file():
        return root
    if not root.is_dir():
        raise DataError(f"the ChestMNIST folder {root} (data.root) does not exist; it should hold chestmnist_{size}.npz from MedMNIST")
    names = [f"chestmnist_{size}.npz"] + (["chestmnist.npz"] if size == 28 else [])
    for name in names:
        if (root / name).is_file():
            return root / name
    raise DataError(f"no ChestMNIST file in {root}: looked for {' / '.join(names)} (download it from MedMNIST)")


class ChestMNISTSplits(Mapping[str, tuple[np.ndarray, np.ndarray]]):
    """``{"train", "val", "test"} -> (images uint8 [N, s, s], labels int64 [N, 14])`` of one npz.

    The keys are checked when built; each split's arrays are read on first
    access, so asking for the test split of the 224 px file does not load the
    several-GB training images.
    """

    def __init__(self, path: Path, size: int):
        self.path, self.size = path, size
        try:
            with np.load(path, allow_pickle=False) as npz:
                present = set(npz.files)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise DataError(f"cannot read the ChestMNIST file {path}: {exc}") from None
        missing = [f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels") if f"{s}_{kind}" not in present]
        if missing:
            raise DataError(f"{path}: missing key(s) {', '.join(missing)}; found {', '.join(sorted(present)) or 'none'}")
        self._loaded: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __getitem__(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if split not in SPLITS:
            raise KeyError(f"ChestMNIST split must be one of {SPLITS}, got {split!r}")
        if split not in self._loaded:
            self._loaded[split] = self._load(split)
        return self._loaded[split]

    def __iter__(self) -> Iterator[str]:
        return iter(SPLITS)

    def __len__(self) -> int:
        return len(SPLITS)

    def _load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        s = self.size
        try:
            with np.load(self.path, allow_pickle=False) as npz:
                images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise DataError(f"cannot read {split}_images / {split}_labels of {self.path}: {exc}") from None
        if images.ndim == 4 and images.shape[-1] == 1:
            images = images[..., 0]  # some exports keep a channel axis
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (s, s):
            raise DataError(f"{self.path}: {split}_images must be uint8 [N, {s}, {s}], got {images.dtype} {images.shape}")
        if labels.shape != (len(images), NUM_FINDINGS):
            raise DataError(f"{self.path}: {split}_labels must be [{len(images)}, {NUM_FINDINGS}], got {labels.shape}")
        if not np.isin(labels, (0, 1)).all():
            raise DataError(f"{self.path}: {split}_labels must be 0/1, found values {np.unique(labels)[:10].tolist()}")
        return images, labels.astype(np.int64)


def read_chestmnist(root: str | Path, size: int = 64) -> ChestMNISTSplits:
    """The train / val / test splits of ``chestmnist_{size}.npz`` in ``root``.

    Returns a read-only mapping ``split -> (images uint8 [N, size, size],
    labels int [N, 14])`` whose splits load on first access. ``size`` is one
    of 28, 64, 128, 224 (28 may be the plain ``chestmnist.npz``). Raises
    DataError naming the file and key when the file or a key is missing or
    malformed.
    """
    size = int(size)
    return ChestMNISTSplits(chestmnist_file(root, size), size)


class ChestMNISTDataset(Dataset):
    """ChestMNIST images as sample dicts at ``image_size`` pixels.

    MedMNIST has no boxes (all NaN) and no patient ids (empty strings); ids are
    ``chestmnist_{split}_{i}``. Images are resized when ``image_size`` differs
    from the file's size.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, image_size: int, split: str):
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f"ChestMNISTDataset: images must be uint8 [N, s, s], got {images.dtype} {images.shape}")
        if np.shape(labels) != (len(images), NUM_FINDINGS):
            raise ValueError(f"ChestMNISTDataset: labels must be [{len(images)}, {NUM_FINDINGS}], got {np.shape(labels)}")
        if int(image_size) < 1:
            raise ValueError(f"ChestMNISTDataset: image_size must be >= 1, got {image_size}")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.float32)
        self.image_size = int(image_size)
        self.split = split

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} ChestMNIST {self.split} images")
        i = i % len(self)
        image = resize_uint8(np.ascontiguousarray(self.images[i]), self.image_size).astype(np.float32) / 255.0
        return {
            "image": torch.from_numpy(image)[None],
            "labels": torch.from_numpy(self.labels[i].copy()),
            "boxes": torch.full((NUM_FINDINGS, 4), float("nan")),
            "id": f"chestmnist_{self.split}_{i}",
            "patient_id": "",
        }
