"""A VinDr-CXR folder as the Kaggle download unpacks (``train.csv``, ``train/<image_id>.dicom``),
built from the real annotation rows torchxrayvision ships, with DICOMs written by pydicom at
non-square sizes of the VinDr range (2,000-3,400 px) that hold each image's boxes, 12- and
14-bit, MONOCHROME2 and MONOCHROME1."""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from dicom_fixtures import write_dicom

# (columns, rows): the smallest that holds an image's boxes is used
SIZES = ((2304, 2880), (2048, 2500), (2500, 3000), (2836, 3200), (3200, 3400))


def shipped_rows() -> pd.DataFrame:
    import torchxrayvision as xrv

    with gzip.open(os.path.join(os.path.dirname(xrv.__file__), "data", "vinbigdata-train.csv.gz"), "rt") as f:
        return pd.read_csv(f)


def pick_images(rows: pd.DataFrame, with_findings: int, without: int) -> list[str]:
    """The first images (in file order) with findings and with only 'No finding' rows."""
    only_none = rows.groupby("image_id")["class_name"].agg(lambda c: bool((c == "No finding").all()))
    ordered = list(dict.fromkeys(rows["image_id"]))
    found = [i for i in ordered if not only_none[i]][:with_findings]
    empty = [i for i in ordered if only_none[i]][:without]
    return found + empty


def stored_size(rows: pd.DataFrame) -> tuple[int, int]:
    need_x, need_y = rows["x_max"].max(), rows["y_max"].max()
    for cols, height in SIZES:
        if not (need_x > cols or need_y > height):  # NaN (No finding) fits anything
            return cols, height
    raise ValueError(f"no fixture size holds a box ending at ({need_x}, {need_y})")


def make_vindr_root(tmp_path: Path, image_ids: Sequence[str], *, rows: pd.DataFrame | None = None,
                    sizes: dict[str, tuple[int, int]] | None = None, missing: Sequence[str] = ()) -> Path:
    """A VinDr folder with ``image_ids``' real rows in train.csv and one DICOM each (none for
    ``missing``). ``sizes`` fixes an image's (columns, rows); by default :func:`stored_size`.
    Every second image is MONOCHROME1 (inverted) and 14-bit, the others MONOCHROME2 and 12-bit;
    each image is a vertical ramp, brighter where its first box is."""
    rows = shipped_rows() if rows is None else rows
    root = tmp_path / "vinbigdata"
    (root / "train").mkdir(parents=True)
    chosen = rows[rows["image_id"].isin(image_ids)]
    chosen.to_csv(root / "train.csv", index=False)
    for n, image_id in enumerate(image_ids):
        if image_id in missing:
            continue
        of_image = chosen[chosen["image_id"] == image_id]
        cols, height = (sizes or {}).get(image_id) or stored_size(of_image)
        bits = 14 if n % 2 else 12
        top = 2**bits - 1
        image = np.repeat(np.linspace(0.2, 0.6, height)[:, None], cols, axis=1)
        first = of_image.dropna(subset=["x_min"]).head(1)
        for b in first.itertuples():
            image[int(b.y_min):int(b.y_max), int(b.x_min):int(b.x_max)] = 0.95
        stored = np.round(image * top).astype(np.uint16)
        photometric = "MONOCHROME2"
        if n % 2:
            stored, photometric = (top - stored).astype(np.uint16), "MONOCHROME1"
        write_dicom(root / "train" / f"{image_id}.dicom", stored, photometric=photometric, bits_stored=bits)
    return root
