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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from causal_ie.data.errors import DataError, ProblemLog
from causal_ie.data.ground_truth import READER_RULES, box_mask, combine_readers
from causal_ie.labels import LabelSpace

log = logging.getLogger(__name__)

ANNOTATION_FILES = ("train.csv", "annotations/annotations_train.csv")
IMAGE_FOLDER = "train"
SUFFIX = ".dicom"
COLUMNS = ("image_id", "class_name", "rad_id", "x_min", "y_min", "x_max", "y_max")
NO_FINDING = "No finding"


def annotation_file(root: str | Path) -> Path:
    """The readers' annotation CSV under ``root``, or DataError naming what was looked for."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"the VinDr-CXR folder {root} (data.root) does not exist; it should hold "
                        f"{ANNOTATION_FILES[0]} and {IMAGE_FOLDER}/<image_id>{SUFFIX}")
    for name in ANNOTATION_FILES:
        if (root / name).is_file():
            return root / name
    raise DataError(f"no VinDr-CXR annotations in {root} (data.root): looked for {' and '.join(ANNOTATION_FILES)}")


def read_annotations(path: str | Path) -> pd.DataFrame:
    """The readers' rows of a VinDr-CXR annotation CSV, checked: every column of :data:`COLUMNS`
    present, and a box's corners numbers with ``x_min < x_max`` and ``y_min < y_max`` on every
    row that is not ``No finding``. DataError names the file, the column or the row."""
    path = Path(path)
    try:
        rows = pd.read_csv(path, dtype={"image_id": str, "class_name": str, "rad_id": str})
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"cannot read the VinDr-CXR annotations {path}: {exc}") from None
    missing = [c for c in COLUMNS if c not in rows.columns]
    if missing:
        raise DataError(f"{path} lacks column(s) {', '.join(missing)}; a VinDr-CXR annotation file has "
                        f"{', '.join(COLUMNS)} (found {', '.join(map(str, rows.columns))})")
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


class VinDrDataset(Dataset):
    """VinDr-CXR images with labels and per-label masks drawn from the readers' boxes.

    Args:
        images: uint8 [M, S, S] cached images.
        rows: [N] row of ``images`` holding item i.
        labels: [N, K] 0/1 in ``labels_space`` order.
        ids: N image ids.
        stored_sizes: [N, 2] (columns, rows) of each DICOM, the pixels its boxes are in.
        boxes: the annotation rows with a box, columns ``item`` (index into the N items),
            ``label`` (index into K), ``reader`` and ``x_min, y_min, x_max, y_max``.
        readers: ``any`` or ``majority`` (:func:`~causal_ie.data.ground_truth.combine_readers`).

    An item is ``{"image": float32 [1, S, S] in [0, 1], "labels": float32 [K], "masks": bool
    [K, S, S], "boxes": float32 [K, 4] (the masks' bounding boxes, x, y, w, h; NaN where a
    label has no mask), "id", "patient_id"}``.
    """

    def __init__(
        self,
        images: np.ndarray,
        rows: np.ndarray,
        labels: np.ndarray,
        ids: Sequence[str],
        stored_sizes: np.ndarray,
        boxes: pd.DataFrame,
        readers: str = "any",
    ):
        if readers not in READER_RULES:
            raise ValueError(f"data.readers={readers!r}: expected one of {', '.join(READER_RULES)}")
        n = len(ids)
        self.images, self.rows = images, np.asarray(rows, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.float32)
        if self.labels.shape[0] != n or self.rows.shape != (n,) or np.asarray(stored_sizes).shape != (n, 2):
            raise ValueError(f"VinDrDataset: {n} ids need {n} rows, label rows and stored sizes")
        self.ids = [str(i) for i in ids]
        self.patient_ids = self.ids  # VinDr publishes no patient ids
        self.stored_sizes = np.asarray(stored_sizes, dtype=np.int64)
        self.readers = readers
        self.image_size = int(images.shape[1])
        self._boxes = {item: group for item, group in boxes.groupby("item")}

    def __len__(self) -> int:
        return len(self.ids)

    def masks(self, i: int) -> torch.Tensor:
        """bool [K, S, S]: each label's ground truth on item ``i``, readers combined."""
        size = (self.image_size, self.image_size)
        out = torch.zeros((self.labels.shape[1], *size), dtype=torch.bool)
        group = self._boxes.get(i)
        if group is None:
            return out
        cols, rows = self.stored_sizes[i]
        for label, of_label in group.groupby("label"):
            per_reader = []
            for _, of_reader in of_label.groupby("reader"):
                drawn = [box_mask(b, (int(rows), int(cols)), size, corners=True)
                         for b in of_reader[["x_min", "y_min", "x_max", "y_max"]].to_numpy(np.float64)]
                per_reader.append(torch.stack(drawn).any(0))
            out[int(label)] = combine_readers(per_reader, self.readers)
        return out

    def has_ground_truth(self) -> np.ndarray:
        """bool [N]: items with at least one box (under ``any``; ``majority`` may leave fewer)."""
        has = np.zeros(len(self), dtype=bool)
        has[list(self._boxes)] = True
        return has

    def __getitem__(self, i: int) -> dict[str, Any]:
        masks = self.masks(i)
        return {
            "image": torch.from_numpy(np.asarray(self.images[self.rows[i]], dtype=np.float32) / 255.0)[None],
            "labels": torch.from_numpy(self.labels[i].copy()),
            "masks": masks,
            "boxes": mask_boxes(masks),
            "id": self.ids[i],
            "patient_id": self.patient_ids[i],
        }


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """float32 [K, 4]: the bounding box (x, y, w, h in pixels) of each mask [K, H, W]; NaN where
    a mask is empty. What box-only code (figures, counterfactual targets) draws."""
    out = torch.full((masks.shape[0], 4), float("nan"))
    for k in range(masks.shape[0]):
        ys, xs = torch.nonzero(masks[k], as_tuple=True)
        if ys.numel():
            x0, y0 = int(xs.min()), int(ys.min())
            out[k] = torch.tensor([x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0], dtype=torch.float32)
    return out


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
