"""An RSNA Pneumonia folder as the Kaggle download unpacks (``stage_2_train_labels.csv``,
``stage_2_train_images/<patientId>.dcm``), built from the real label rows torchxrayvision ships,
with 1024 px 8-bit MONOCHROME2 CR DICOMs, JPEG baseline compressed as the real ones are, whose
headers carry the image's real view position and id."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from dicom_fixtures import CR, write_dicom


def xrv_file(name: str) -> str:
    import torchxrayvision as xrv

    return os.path.join(os.path.dirname(xrv.__file__), "data", name)


def shipped_rows() -> pd.DataFrame:
    return pd.read_csv(xrv_file("kaggle_stage_2_train_labels.csv.zip"))


def shipped_views() -> pd.Series:
    headers = pd.read_csv(xrv_file("kaggle_stage_2_train_images_dicom_headers.csv.gz"), index_col="PatientID")
    return headers["ViewPosition"]


def pick_images(rows: pd.DataFrame, boxes: Sequence[int], negatives: int) -> list[str]:
    """The first image (in file order) with each number of boxes in ``boxes``, then ``negatives``
    images without opacity."""
    counts = rows[rows["Target"] == 1].groupby("patientId", sort=False).size()
    chosen: list[str] = []
    for n in boxes:
        chosen.append(next(i for i, c in counts.items() if c == n and i not in chosen))
    negative = [i for i in dict.fromkeys(rows["patientId"]) if i not in counts.index][:negatives]
    return chosen + negative


def make_rsna_root(tmp_path: Path, image_ids: Sequence[str], *, rows: pd.DataFrame | None = None,
                   missing: Sequence[str] = (), size: int = 1024) -> Path:
    """An RSNA folder with ``image_ids``' real rows and one DICOM each (none for ``missing``): a
    vertical ramp, brighter inside the image's boxes."""
    rows = shipped_rows() if rows is None else rows
    views = shipped_views()
    root = tmp_path / "rsna"
    (root / "stage_2_train_images").mkdir(parents=True)
    chosen = rows[rows["patientId"].isin(image_ids)]
    chosen.to_csv(root / "stage_2_train_labels.csv", index=False)
    for image_id in image_ids:
        if image_id in missing:
            continue
        image = np.repeat(np.linspace(40, 160, size)[:, None], size, axis=1)
        for b in chosen[(chosen["patientId"] == image_id) & (chosen["Target"] == 1)].itertuples():
            image[int(b.y):int(b.y + b.height), int(b.x):int(b.x + b.width)] = 230
        write_dicom(root / "stage_2_train_images" / f"{image_id}.dcm", image.astype(np.uint16), bits_stored=8,
                    sop_class=CR, jpeg=True, header={"PatientID": image_id, "ViewPosition": views[image_id]})
    return root
