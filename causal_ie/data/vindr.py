"""VinDr-CXR: its readers' boxes, its DICOMs through torchxrayvision's ``VinDr_Dataset``, the data set.

The folder as the Kaggle download (VinBigData challenge) unpacks: ``train.csv`` and
``train/<image_id>.dicom``; the PhysioNet release's ``annotations/annotations_train.csv`` is
read too. One CSV row is one reader's box (``rad_id``, ``class_name``, ``x_min, y_min, x_max,
y_max`` in the DICOM's own pixels) or one reader's ``No finding``; each image is read by 3
of 17 radiologists.

torchxrayvision's ``VinDr_Dataset`` reads the labels (a finding is present when any reader
marked it) and names them. The pixels are read by the project's DICOM reader
(:func:`causal_ie.data.images.read_dicom`: modality LUT, MONOCHROME1 inverted, [0, 1]), not by
torchxrayvision's: its 1.5.7 inverts MONOCHROME1 as ``-1 * img`` on the unsigned stored
pixels, which NumPy 2 refuses (``OverflowError``) for every such DICOM without a rescale or a
window. They are cached at ``image_size`` once (:mod:`causal_ie.data.cache`), together with
each DICOM's stored (columns, rows). The ground truth is kept as the readers' boxes and
drawn per item as masks at ``image_size``: each box is scaled by its own DICOM's rows and
columns (2,000-3,000 px, not square), a reader's boxes of a finding are united, and the
readers combine by ``readers`` (``any``: the union; ``majority``: pixels at least 2 of the 3
marked). VinDr publishes no patient ids: each image is its own patient in the splits.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from causal_ie.data.errors import DataError, ProblemLog, find_metadata, read_table, require_columns
from causal_ie.labels import LabelSpace

log = logging.getLogger(__name__)

ANNOTATION_FILES = ("train.csv", "annotations/annotations_train.csv")
IMAGE_FOLDER = "train"
SUFFIX = ".dicom"
COLUMNS = ("image_id", "class_name", "rad_id", "x_min", "y_min", "x_max", "y_max")
NO_FINDING = "No finding"


def annotation_file(root: str | Path) -> Path:
    """The readers' annotation CSV under ``root``, or DataError naming what was looked for."""
    return find_metadata(root, ANNOTATION_FILES, "VinDr-CXR", f"{ANNOTATION_FILES[0]} and {IMAGE_FOLDER}/<image_id>{SUFFIX}")


def read_annotations(path: str | Path) -> pd.DataFrame:
    """The readers' rows of a VinDr-CXR annotation CSV, checked: every column of :data:`COLUMNS`
    present, and a box's corners numbers with ``x_min < x_max`` and ``y_min < y_max`` on every
    row that is not ``No finding``. DataError names the file, the column or the row."""
    path = Path(path)
    rows = read_table(path, "VinDr-CXR annotations", dtype={"image_id": str, "class_name": str, "rad_id": str})
    require_columns(path, rows.columns, COLUMNS, f"a VinDr-CXR annotation file has {', '.join(COLUMNS)}")
    boxes = rows[rows["class_name"] != NO_FINDING]
    corners = boxes[["x_min", "y_min", "x_max", "y_max"]].apply(pd.to_numeric, errors="coerce")
    bad = corners.isna().any(axis=1) | (corners["x_min"] >= corners["x_max"]) | (corners["y_min"] >= corners["y_max"])
    if bad.any():
        i = int(bad.to_numpy().nonzero()[0][0])
        row = boxes.iloc[i]
        raise DataError(f"{path} line {int(boxes.index[i]) + 2}: the {row['class_name']} box of image {row['image_id']} "
                        f"(reader {row['rad_id']}) needs numbers x_min < x_max, y_min < y_max, got "
                        f"{[row[c] for c in ('x_min', 'y_min', 'x_max', 'y_max')]}")
    return rows


def xrv_dataset(root: str | Path, annotations: Path) -> Any:
    """torchxrayvision's reader of the folder (labels, pixels and its pathology names)."""
    import torchxrayvision as xrv

    return xrv.datasets.VinDr_Dataset(imgpath=str(Path(root) / IMAGE_FOLDER), csvpath=str(annotations))


def label_space(reader: Any) -> LabelSpace:
    """VinDr-CXR's labels as torchxrayvision names them (``Nodule/Mass`` stands for NIH's Nodule
    and Mass; ``Effusion`` and ``Pleural_Thickening`` are its ``Pleural effusion`` and
    ``Pleural thickening``)."""
    aliases = {syn: name for name, syns in reader.mapping.items() for syn in syns}
    return LabelSpace(tuple(reader.pathologies), "vindr", aliases, {"Nodule/Mass": ("Nodule", "Mass")})


def box_rows(annotations: pd.DataFrame, space: LabelSpace, item_of: dict[str, int],
             sizes: np.ndarray, problems: ProblemLog) -> pd.DataFrame:
    """The rows with a box of the served images, with ``item``, ``label`` and ``reader`` codes. A
    box that ends past its DICOM's stored (columns, rows) ``sizes[item]`` is a problem."""
    boxes = annotations[(annotations["class_name"] != NO_FINDING) & annotations["image_id"].isin(item_of)].copy()
    label_of = {name: space.find(name) for name in boxes["class_name"].unique()}
    ignored = sorted(str(n) for n, k in label_of.items() if k is None)
    if ignored:  # the PhysioNet release adds local labels (Rib fracture, ...) torchxrayvision does not read
        log.info("VinDr-CXR boxes of labels not read, left out: %s", ", ".join(ignored))
    boxes["label"] = boxes["class_name"].map(label_of)
    boxes = boxes[boxes["label"].notna()]
    boxes["label"] = boxes["label"].astype(int)
    boxes["item"] = boxes["image_id"].map(item_of).astype(int)
    boxes["reader"] = boxes["rad_id"].astype(str)
    for c in ("x_min", "y_min", "x_max", "y_max"):
        boxes[c] = boxes[c].astype(float)
    size = sizes[boxes["item"].to_numpy()] if len(boxes) else np.zeros((0, 2))
    outside = (boxes["x_min"].to_numpy() < 0) | (boxes["y_min"].to_numpy() < 0) | \
        (boxes["x_max"].to_numpy() > size[:, 0]) | (boxes["y_max"].to_numpy() > size[:, 1])
    for row, (cols, rows) in zip(boxes[outside].itertuples(), size[outside]):
        problems.report("box outside its image", f"{row.image_id} ({row.class_name}, reader {row.reader})",
                        f"corners ({row.x_min}, {row.y_min}, {row.x_max}, {row.y_max}) in a {cols} x {rows} DICOM")
    return boxes[~outside][["item", "label", "reader", "x_min", "y_min", "x_max", "y_max"]]
