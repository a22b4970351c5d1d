"""A CheXpert folder as the download unpacks (``CheXpert-v1.0-small/train.csv``, ``valid.csv``,
``train/patientNNNNN/studyN/viewN_frontal.jpg``), built from the real training rows
torchxrayvision ships, with 8-bit grayscale JPEGs of the small release's sizes (320 px on the
short side, not square). Its ``valid.csv`` takes later shipped rows, moved to ``valid/`` patients
and with their labels made 0/1, as the real one is (radiologists' consensus: no uncertain, no
blank)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

RELEASE = "CheXpert-v1.0-small"
FINDINGS_FROM = 5  # the label columns start after Path, Sex, Age, Frontal/Lateral, AP/PA


def shipped_rows() -> pd.DataFrame:
    import torchxrayvision as xrv

    return pd.read_csv(os.path.join(os.path.dirname(xrv.__file__), "data", "chexpert_train.csv.gz"))


def valid_rows(rows: pd.DataFrame, n: int, start: int = 1000) -> pd.DataFrame:
    """``n`` frontal shipped rows from ``start`` on, as valid.csv rows of patients 64541, ..."""
    chosen = rows.iloc[start:][rows.iloc[start:]["Frontal/Lateral"] == "Frontal"].head(n).copy()
    chosen["Path"] = [f"{RELEASE}/valid/patient{64541 + i}/study1/view1_frontal.jpg" for i in range(n)]
    labels = chosen.columns[FINDINGS_FROM:]
    chosen[labels] = chosen[labels].replace(-1.0, 0.0).fillna(0.0)
    return chosen


def make_chexpert_root(tmp_path: Path, train: pd.DataFrame, valid: pd.DataFrame | None = None,
                       missing: tuple[str, ...] = ()) -> Path:
    """``tmp_path/CheXpert-v1.0-small`` with ``train`` (and ``valid``) as its CSVs and a JPEG per
    row (none for the paths in ``missing``): a vertical ramp, lateral views landscape."""
    root = tmp_path / RELEASE
    root.mkdir(parents=True)
    train.to_csv(root / "train.csv", index=False)
    tables = [train]
    if valid is not None:
        valid.to_csv(root / "valid.csv", index=False)
        tables.append(valid)
    for _, row in pd.concat(tables).iterrows():
        if row["Path"] in missing:
            continue
        path = root / Path(row["Path"]).relative_to(RELEASE)
        path.parent.mkdir(parents=True, exist_ok=True)
        width, height = (390, 320) if row["Frontal/Lateral"] == "Lateral" else (320, 389)
        ramp = np.repeat(np.linspace(30, 220, height)[:, None], width, axis=1).astype(np.uint8)
        Image.fromarray(ramp, mode="L").save(path, quality=95)
    return root
