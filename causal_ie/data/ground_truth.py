"""Radiologists' ground truth as per-label pixel masks: boxes and segmentations on one path.

Localisation metrics (:mod:`causal_ie.explain.metrics`) score a map against a mask, so boxes
(NIH, VinDr-CXR, RSNA) and segmentations (SIIM-ACR's run-length encoded masks) go through the
same code. Each data set stores its ground truth in its own pixels:

- NIH's boxes are in the 1024 px PNG's pixels (its CSV's ``OriginalImage`` size, about 2,700 px,
  is the size before the PNGs were made; scaling by it is wrong);
- VinDr-CXR's boxes (``x_min, y_min, x_max, y_max``) are in the DICOM's own pixels, and its
  DICOMs are about 2,000-3,000 px and not square: rows and columns scale apart;
- RSNA's boxes (``x, y, width, height``) and SIIM's masks are in their 1024 px DICOMs' pixels.

:func:`box_mask` scales a box from the image's stored (rows, columns) to the map's, and
:func:`rle_mask` decodes SIIM's run-length encoding (runs of pixels in column-major order,
each start counted from the end of the previous run; ``-1``: no pneumothorax). An image with
several SIIM rows has one run-length string per component: the mask is their union
(torchxrayvision 1.5.7's ``SIIM_Pneumothorax_Dataset.get_pathology_mask_dict`` keeps only the
last one). VinDr-CXR has three readers per image: :func:`combine_readers` takes their union
(``any``, the default) or the pixels at least two of them marked (``majority``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from causal_ie import validators

READER_RULES = ("any", "majority")


def box_masks(boxes: Tensor, height: int, width: int) -> Tensor:
    """Pixels inside each ``(x, y, w, h)`` box, as a bool tensor ``[P, height, width]``.

    A pixel is inside when its centre is (``x <= c + 0.5 < x + w``, likewise for
    rows), so integer boxes cover exactly columns ``x .. x+w-1`` and fractional
    boxes (e.g. rescaled from another resolution) still get a well defined
    pixel set. A box with NaNs (no box) covers nothing.
    """
    boxes = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    x, y, w, h = (boxes[:, i, None] for i in range(4))
    col_centres = torch.arange(width, dtype=torch.float64, device=boxes.device) + 0.5
    row_centres = torch.arange(height, dtype=torch.float64, device=boxes.device) + 0.5
    in_cols = (x <= col_centres) & (col_centres < x + w)  # [P, W]
    in_rows = (y <= row_centres) & (row_centres < y + h)  # [P, H]
    return in_rows[:, :, None] & in_cols[:, None, :]


def box_mask(
    box: Sequence[float], stored_size: tuple[int, int], size: tuple[int, int], *, corners: bool = False
) -> Tensor:
    """The pixels of ``size`` = (rows, columns) inside ``box``, given in the pixels of an image
    stored at ``stored_size`` = (rows, columns). ``box`` is ``(x, y, w, h)``, or with
    ``corners=True`` ``(x_min, y_min, x_max, y_max)`` (VinDr-CXR). A pixel is inside when its
    centre is (:func:`box_masks`)."""
    if len(box) != 4:
        raise ValueError(f"a box has 4 numbers, got {list(box)!r}")
    (stored_rows, stored_cols), (rows, cols) = stored_size, size
    if min(stored_rows, stored_cols, rows, cols) < 1:
        raise ValueError(f"image sizes must be positive, got stored {stored_size} and map {size}")
    x, y, a, b = (float(v) for v in box)
    w, h = (a - x, b - y) if corners else (a, b)
    sx, sy = cols / stored_cols, rows / stored_rows
    return box_masks(torch.tensor([[x * sx, y * sy, w * sx, h * sy]]), rows, cols)[0]


def rle_mask(encodings: str | Iterable[str], stored_size: tuple[int, int] = (1024, 1024)) -> Tensor:
    """SIIM-ACR's run-length encoded mask(s) as one bool mask [rows, columns]: the union of every
    string in ``encodings`` (one per component; ``"-1"`` or ``""`` adds nothing)."""
    rows, cols = stored_size
    flat = np.zeros(rows * cols, dtype=bool)
    for encoding in [encodings] if isinstance(encodings, str) else encodings:
        text = str(encoding).strip()
        if text in ("", "-1"):
            continue
        try:
            numbers = [int(v) for v in text.split()]
        except ValueError:
            raise ValueError(f"EncodedPixels must be integers 'start length ...', got {text[:60]!r}") from None
        if len(numbers) % 2 or any(v < 0 for v in numbers):
            raise ValueError(f"EncodedPixels must be pairs of non-negative 'start length', got {text[:60]!r}")
        position = 0
        for start, length in zip(numbers[0::2], numbers[1::2]):
            position += start
            if position + length > flat.size:
                raise ValueError(
                    f"EncodedPixels runs past the end of a {rows} x {cols} image (pixel {position + length})"
                )
            flat[position:position + length] = True
            position += length
    # runs go down the columns: pixel (r, c) is flat index c * rows + r
    return torch.from_numpy(flat.reshape(cols, rows).T.copy())


def resize_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """A bool mask at another resolution: each target pixel takes the stored pixel under its
    centre (nearest, as the box's centre rule)."""
    rows, cols = mask.shape
    r = ((torch.arange(size[0], dtype=torch.float64) + 0.5) * rows / size[0]).floor().long().clamp(max=rows - 1)
    c = ((torch.arange(size[1], dtype=torch.float64) + 0.5) * cols / size[1]).floor().long().clamp(max=cols - 1)
    return mask[r[:, None], c[None, :]]


def combine_readers(masks: Sequence[Tensor], rule: str = "any") -> Tensor:
    """One mask from each reader's mask of a label (a reader's several boxes already united):
    ``any`` the union, ``majority`` the pixels at least 2 readers marked (2 of VinDr's 3)."""
    validators.choice("data.readers", rule, READER_RULES)
    if not masks:
        raise ValueError("combine_readers needs at least one reader's mask")
    votes = torch.stack([m.bool() for m in masks]).sum(dim=0)
    return votes >= (1 if rule == "any" else 2)


def mask_boxes(masks: Tensor) -> Tensor:
    """float32 [K, 4]: the bounding box (x, y, w, h in pixels) of each mask [K, H, W]; NaN where
    a mask is empty. What box-only code (figures, counterfactual targets) draws."""
    out = torch.full((masks.shape[0], 4), float("nan"))
    for k in range(masks.shape[0]):
        ys, xs = torch.nonzero(masks[k], as_tuple=True)
        if ys.numel():
            x0, y0 = int(xs.min()), int(ys.min())
            out[k] = torch.tensor([x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0], dtype=torch.float32)
    return out


class ReaderBoxes:
    """Boxes of one split's items as per-label masks, drawn on demand (14 masks per image would
    not fit a cache; the boxes are the masks' exact description).

    Args:
        boxes: one row per box: ``item`` (index into the split), ``label`` (index into the K
            labels), ``reader`` and ``x_min, y_min, x_max, y_max`` in the stored image's pixels.
        stored_sizes: [n, 2] (columns, rows) of each item's file.
        num_labels: K.
        rule: how the readers' masks combine (:func:`combine_readers`); one reader: either.
    """

    def __init__(self, boxes: pd.DataFrame, stored_sizes: np.ndarray, num_labels: int, rule: str = "any"):
        validators.choice("data.readers", rule, READER_RULES)
        self.stored_sizes = np.asarray(stored_sizes, dtype=np.int64)
        self.num_labels, self.rule = int(num_labels), rule
        self._of_item = {int(item): group for item, group in boxes.groupby("item")}

    def has(self) -> np.ndarray:
        has = np.zeros(len(self.stored_sizes), dtype=bool)
        has[list(self._of_item)] = True
        return has

    def masks(self, i: int, size: int) -> Tensor:
        out = torch.zeros((self.num_labels, size, size), dtype=torch.bool)
        group = self._of_item.get(int(i))
        if group is None:
            return out
        cols, rows = (int(v) for v in self.stored_sizes[i])
        for label, of_label in group.groupby("label"):
            per_reader = []
            for _, of_reader in of_label.groupby("reader"):
                drawn = [box_mask(b, (rows, cols), (size, size), corners=True)
                         for b in of_reader[["x_min", "y_min", "x_max", "y_max"]].to_numpy(np.float64)]
                per_reader.append(torch.stack(drawn).any(0))
            out[int(label)] = combine_readers(per_reader, self.rule)
        return out
