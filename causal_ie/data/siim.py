"""SIIM-ACR Pneumothorax: its run-length encoded masks and its DICOMs, as the Kaggle download unpacks.

``train-rle.csv`` (columns ``ImageId`` and ``' EncodedPixels'``, with its leading space; the
stage-2 file and torchxrayvision's copy spell it without or with) and
``dicom-images-train/<study>/<series>/<ImageId>.dcm``, 1024 x 1024 px. One CSV row is one
connected pneumothorax component (``-1``: none); an image with several components has several
rows, and its mask is their union (torchxrayvision 1.5.7's reader keeps only the last one, and
its label array has one entry per row, not per image; it also caches the first folder's file
list for every later folder, and needs the leading-space column). So its
``SIIM_Pneumothorax_Dataset`` is not used here: the rows are grouped per image, the label keeps
its name (``Pneumothorax``). The CSV names no patients: the splits are image-wise by seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from causal_ie.data.errors import DataError, find_metadata, read_table
from causal_ie.data.ground_truth import resize_mask, rle_mask

RLE_FILES = ("train-rle.csv", "stage_2_train.csv", "siim-pneumothorax-train-rle.csv", "siim-pneumothorax-train-rle.csv.gz")
IMAGE_FOLDER = "dicom-images-train"
ENCODED = (" EncodedPixels", "EncodedPixels")
LABEL = "Pneumothorax"  # as torchxrayvision names it


def rle_file(root: str | Path) -> Path:
    """The run-length CSV under ``root``, or DataError naming what was looked for."""
    return find_metadata(root, RLE_FILES, "SIIM-ACR", f"train-rle.csv and {IMAGE_FOLDER}/<study>/<series>/<ImageId>.dcm")


def read_rle(path: str | Path) -> pd.DataFrame:
    """The rows of a SIIM-ACR run-length file as ``ImageId`` and ``EncodedPixels`` (stripped),
    whichever spelling of the column the file has. DataError names the file and the columns."""
    path = Path(path)
    rows = read_table(path, "SIIM-ACR run-length file", dtype=str)
    column = next((c for c in ENCODED if c in rows.columns), None)
    if "ImageId" not in rows.columns or column is None:
        raise DataError(f"{path} needs the columns ImageId and ' EncodedPixels' (or 'EncodedPixels'); "
                        f"found {', '.join(repr(c) for c in rows.columns)}")
    return pd.DataFrame({"ImageId": rows["ImageId"].str.strip(), "EncodedPixels": rows[column].fillna("-1").str.strip()})


def find_dicoms(root: str | Path) -> dict[str, Path]:
    """``ImageId`` -> its DICOM anywhere under ``dicom-images-train/``."""
    return {p.stem: p for p in (Path(root).expanduser() / IMAGE_FOLDER).rglob("*.dcm")}


class RunLengthMasks:
    """One split's SIIM masks, decoded on demand from the run-length strings at the stored size
    of each DICOM and resized (nearest, the box's centre rule) to the batch's size."""

    def __init__(self, encodings: list[list[str]], stored_sizes: np.ndarray, label: int, num_labels: int):
        self.encodings = encodings
        self.stored_sizes = np.asarray(stored_sizes, dtype=np.int64)
        self.label, self.num_labels = int(label), int(num_labels)
        self._has = np.array([any(e not in ("", "-1") for e in encs) for encs in encodings], dtype=bool)

    def has(self) -> np.ndarray:
        return self._has

    def masks(self, i: int, size: int) -> Tensor:
        out = torch.zeros((self.num_labels, size, size), dtype=torch.bool)
        if self._has[i]:
            cols, rows = (int(v) for v in self.stored_sizes[i])
            out[self.label] = resize_mask(rle_mask(self.encodings[i], (rows, cols)), (size, size))
        return out
