"""A SIIM-ACR Pneumothorax folder as the Kaggle download unpacks (``train-rle.csv`` with its
``' EncodedPixels'`` column, ``dicom-images-train/<study>/<series>/<ImageId>.dcm``), built from
the real run-length rows torchxrayvision ships, with 1024 px 8-bit MONOCHROME2 DICOMs written
by pydicom."""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from dicom_fixtures import write_dicom


def shipped_rows() -> pd.DataFrame:
    import torchxrayvision as xrv

    with gzip.open(os.path.join(os.path.dirname(xrv.__file__), "data", "siim-pneumothorax-train-rle.csv.gz"), "rt") as f:
        return pd.read_csv(f, dtype=str)


def pick_images(rows: pd.DataFrame, components: Sequence[int], negatives: int) -> list[str]:
    """The first image (in file order) with each number of components in ``components``, then
    ``negatives`` images without pneumothorax."""
    positive = rows[rows[" EncodedPixels"].str.strip() != "-1"]
    counts = positive.groupby("ImageId", sort=False).size()
    chosen: list[str] = []
    for n in components:
        chosen.append(next(i for i, c in counts.items() if c == n and i not in chosen))
    negative = [i for i in dict.fromkeys(rows["ImageId"]) if i not in counts.index][:negatives]
    return chosen + negative


def make_siim_root(tmp_path: Path, image_ids: Sequence[str], *, rows: pd.DataFrame | None = None,
                   missing: Sequence[str] = ()) -> Path:
    rows = shipped_rows() if rows is None else rows
    root = tmp_path / "siim"
    root.mkdir(parents=True)
    rows[rows["ImageId"].isin(image_ids)].to_csv(root / "train-rle.csv", index=False)  # keeps ' EncodedPixels'
    rng = np.random.default_rng(0)
    for n, image_id in enumerate(image_ids):
        if image_id in missing:
            continue
        folder = root / "dicom-images-train" / f"1.2.276.0.7230010.3.1.2.{n}" / f"1.2.276.0.7230010.3.1.3.{n}"
        folder.mkdir(parents=True)
        image = np.clip(np.linspace(40, 200, 1024)[:, None] + rng.normal(0, 5, (1024, 1024)), 0, 255)
        write_dicom(folder / f"{image_id}.dcm", image.astype(np.uint16), bits_stored=8)
    return root
