"""RSNA Pneumonia Detection: its boxes, its DICOMs through torchxrayvision's ``RSNA_Pneumonia_Dataset``.

The folder as the Kaggle download unpacks: ``stage_2_train_labels.csv`` and
``stage_2_train_images/<patientId>.dcm`` (the stage-1 release: ``stage_1_...``). One CSV row is
one box (``x, y, width, height`` in the 1024 px DICOM's pixels, ``Target`` 1) or one image
without opacity (``Target`` 0, no box); an image with several opacities has several rows. The
``patientId`` names one image, not a patient (the challenge did not publish NIH's patient ids):
the splits are image-wise.

torchxrayvision's reader keeps the frontal views asked for (``views``; it reads each image's
``ViewPosition`` from the DICOM headers table it ships, which covers the stage-2 training set)
and gives two labels, ``Lung Opacity`` and ``Pneumonia``, both the row's ``Target``; every box
marks both, as in its ``get_mask_dict``. The pixels are read by the project's DICOM reader
(:func:`causal_ie.data.images.read_dicom`) into the cache, and each box is scaled by its DICOM's
stored rows and columns (1024 in the real set).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from causal_ie.data.errors import DataError, ProblemLog, find_metadata, read_table, require_columns
from causal_ie.labels import LabelSpace

# label file -> the folder of its DICOMs
RELEASES = {"stage_2_train_labels.csv": "stage_2_train_images", "stage_1_train_labels.csv": "stage_1_train_images"}
SUFFIX = ".dcm"
COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
VIEWS = ("PA", "AP")


def label_file(root: str | Path) -> Path:
    """The labels CSV under ``root``, or DataError naming what was looked for."""
    return find_metadata(root, list(RELEASES), "RSNA Pneumonia",
                         f"stage_2_train_labels.csv and stage_2_train_images/<patientId>{SUFFIX}")


def image_folder(labels: Path) -> Path:
    return labels.parent / RELEASES[labels.name]


def read_labels(path: str | Path) -> pd.DataFrame:
    """The rows of an RSNA labels CSV, checked: every column of :data:`COLUMNS`, ``Target`` 0 or 1,
    and on each ``Target`` 1 row a box of numbers with positive width and height. DataError names
    the file, the column or the line."""
    path = Path(path)
    rows = read_table(path, "RSNA Pneumonia labels", dtype={"patientId": str})
    require_columns(path, rows.columns, COLUMNS, f"an RSNA labels file has {', '.join(COLUMNS)}")
    target = pd.to_numeric(rows["Target"], errors="coerce")
    bad_target = ~target.isin((0, 1))
    box = rows[["x", "y", "width", "height"]].apply(pd.to_numeric, errors="coerce")
    bad_box = (target == 1) & (box.isna().any(axis=1) | (box["width"] <= 0) | (box["height"] <= 0))
    for bad, what in ((bad_target, "a Target of 0 or 1"), (bad_box, "numbers x, y and width, height > 0")):
        if bad.any():
            i = int(bad.to_numpy().nonzero()[0][0])
            row = rows.iloc[i]
            raise DataError(f"{path} line {i + 2}: image {row['patientId']} needs {what}, got "
                            f"{[row[c] for c in COLUMNS[1:]]}")
    return rows.assign(Target=target.astype(int))


def xrv_dataset(labels: Path, views: list[str]) -> Any:
    """torchxrayvision's reader of the folder (labels, views and its pathology names)."""
    import torchxrayvision as xrv

    return xrv.datasets.RSNA_Pneumonia_Dataset(imgpath=str(image_folder(labels)), csvpath=str(labels),
                                                views=list(views), extension=SUFFIX)


def label_space(reader: Any) -> LabelSpace:
    """RSNA's two labels as torchxrayvision names them: ``Lung Opacity`` and ``Pneumonia``."""
    return LabelSpace(tuple(reader.pathologies), "rsna")


def box_rows(rows: pd.DataFrame, space: LabelSpace, item_of: dict[str, int], sizes: np.ndarray,
             problems: ProblemLog) -> pd.DataFrame:
    """The served images' boxes as :class:`~causal_ie.data.ground_truth.ReaderBoxes` rows (corners,
    one reader), each box once per label (it marks both). A box past its DICOM's stored
    (columns, rows) ``sizes[item]`` is a problem."""
    boxes = rows[(rows["Target"] == 1) & rows["patientId"].isin(item_of)]
    item = boxes["patientId"].map(item_of).to_numpy(dtype=np.int64)
    x, y = boxes["x"].to_numpy(float), boxes["y"].to_numpy(float)
    x_max, y_max = x + boxes["width"].to_numpy(float), y + boxes["height"].to_numpy(float)
    size = sizes[item] if len(item) else np.zeros((0, 2))
    outside = (x < 0) | (y < 0) | (x_max > size[:, 0]) | (y_max > size[:, 1])
    for i in np.flatnonzero(outside):
        problems.report("box outside its image", boxes["patientId"].iloc[i],
                        f"box ({x[i]}, {y[i]}, {x_max[i] - x[i]}, {y_max[i] - y[i]}) in a {size[i][0]} x {size[i][1]} DICOM")
    keep = ~outside
    one = pd.DataFrame({"item": item[keep], "reader": "rsna", "x_min": x[keep], "y_min": y[keep],
                        "x_max": x_max[keep], "y_max": y_max[keep]})
    return pd.concat([one.assign(label=k) for k in range(len(space))], ignore_index=True)
