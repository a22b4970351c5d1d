"""CheXpert: its labels through torchxrayvision's ``CheX_Dataset``, uncertain labels by policy.

The folder as the download unpacks: ``CheXpert-v1.0-small/train.csv``, ``valid.csv`` and the
JPEGs under ``train/patientNNNNN/studyN/viewN_frontal.jpg`` (``CheXpert-v1.0/`` for the full
resolution release). A CSV's ``Path`` starts with the release folder's name; it is read
relative to the folder, wherever that lies. ``valid.csv`` (200 patients, labelled by
radiologists' consensus, 0/1 only) is the official test split; the training and validation
splits are drawn patient-wise from ``train.csv`` (its labels come from the CheXpert labeller).

torchxrayvision's reader keeps the views asked for and names the 13 labels (``Pleural
Effusion`` as ``Effusion``); it sets a ``No Finding`` image's labels to 0 (but Support Devices).
It then turns both an uncertain label (``-1``) and a blank one (not mentioned) into NaN. Here
the CSV's values are read again after that step, so the two stay apart:

- uncertain (``-1``) follows ``uncertain``: ``ignore`` (NaN: left out of the loss and the
  AUROCs), ``ones`` (U-Ones) or ``zeros`` (U-Zeros), Irvin et al. 2019's policies;
- blank (not mentioned in the report) is negative, 0, as in Irvin et al. 2019.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from causal_ie.data.errors import DataError, read_table, require_columns
from causal_ie.labels import LabelSpace

RELEASES = ("CheXpert-v1.0-small", "CheXpert-v1.0")
TRAIN, TEST = "train.csv", "valid.csv"
UNCERTAIN = ("ignore", "ones", "zeros")
VIEWS = ("PA", "AP", "L", "LL", "RL")
COLUMNS = ("Path", "Frontal/Lateral", "AP/PA", "No Finding")
XRV_RENAMED = {"Effusion": "Pleural Effusion"}  # torchxrayvision's name -> the CSV's column


def folder(root: str | Path) -> Path:
    """The release folder: ``root`` itself when it holds ``train.csv``, else the release folder
    inside it. DataError names what was looked for."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"the CheXpert folder {root} (data.root) does not exist; it should hold "
                        f"{RELEASES[0]}/{TRAIN} (or be that folder)")
    for candidate in (root, *(root / r for r in RELEASES)):
        if (candidate / TRAIN).is_file():
            return candidate
    raise DataError(f"no CheXpert {TRAIN} in {root} (data.root): looked in it and in {', '.join(RELEASES)}/")


def image_path(release: Path, listed: str) -> Path:
    """A CSV ``Path`` (``CheXpert-v1.0-small/train/...``) under the release folder found."""
    parts = Path(listed).parts
    return release.joinpath(*(parts[1:] if parts and parts[0] in RELEASES else parts))


def check_table(path: Path) -> None:
    """DataError naming the file and the columns when a CheXpert CSV lacks one the reader needs."""
    header = read_table(path, "CheXpert labels", nrows=0).columns
    require_columns(path, header, COLUMNS, "a CheXpert labels file has Path, Sex, Age, Frontal/Lateral, AP/PA, "
                    "No Finding and the 13 findings")


def view_count(table: Path, views: list[str]) -> int:
    """How many of the CSV's images are of ``views`` (lateral: ``L``), as torchxrayvision reads them."""
    if "*" in views:
        return len(pd.read_csv(table, usecols=["Path"]))
    rows = pd.read_csv(table, usecols=["Frontal/Lateral", "AP/PA"])
    view = rows["AP/PA"].where(rows["Frontal/Lateral"] == "Frontal", "L")
    return int(view.isin(views).sum())


def xrv_dataset(release: Path, table: Path, views: list[str]) -> Any:
    """torchxrayvision's reader of one CSV, every image (not one per patient); None when no image
    is of ``views`` (torchxrayvision 1.5.7 fails on an empty table)."""
    import torchxrayvision as xrv

    if view_count(table, views) == 0:
        return None

    def read(csv: Path) -> Any:
        try:
            return xrv.datasets.CheX_Dataset(imgpath=str(release), csvpath=str(csv), views=list(views),
                                             unique_patients=False)
        except (KeyError, NotImplementedError) as exc:  # it finds patients by splitting paths at 'train/'/'valid/'
            raise DataError(f"torchxrayvision could not read {table} ({type(exc).__name__}: {exc}); its Path "
                            "column must read CheXpert-v1.0-small/train/patientNNNNN/... (or valid/)") from None

    if table.name == TEST and "train" in str(table):
        # torchxrayvision 1.5.7 splits every Path at 'train/' when the CSV's own path contains
        # 'train' anywhere (/data/training/...): give it a copy elsewhere (it reads it at once)
        with tempfile.TemporaryDirectory(prefix="chexpert-") as tmp:
            copy = Path(tmp) / TEST
            shutil.copyfile(table, copy)
            return read(copy)
    return read(table)


def label_space(reader: Any) -> LabelSpace:
    """CheXpert's 13 labels as torchxrayvision names them."""
    return LabelSpace(tuple(reader.pathologies), "chexpert")


def labels(reader: Any, uncertain: str) -> tuple[np.ndarray, int]:
    """float32 [N, K] labels of the reader's images under the ``uncertain`` policy (blank: 0), and
    how many uncertain entries there were."""
    values = []
    for name in reader.pathologies:
        column = XRV_RENAMED.get(name, name)
        if column in reader.csv.columns:
            values.append(pd.to_numeric(reader.csv[column], errors="coerce").to_numpy(np.float32))
        else:
            values.append(np.full(len(reader.csv), np.nan, np.float32))
    raw = np.stack(values, axis=1)
    unsure = raw == -1
    out = np.where(np.isnan(raw), 0.0, raw).astype(np.float32)
    out[unsure] = {"ignore": np.nan, "ones": 1.0, "zeros": 0.0}[uncertain]
    return out, int(unsure.sum())


def patient_ids(reader: Any) -> list[str]:
    """``patientNNNNN`` of each image, from its path."""
    found = reader.csv["Path"].astype(str).str.extract(r"(patient\d+)", expand=False)
    if found.isna().any():
        bad = reader.csv["Path"][found.isna()].iloc[0]
        raise DataError(f"CheXpert path {bad!r} names no patient (patientNNNNN)")
    return found.tolist()
