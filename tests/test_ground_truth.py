"""Ground truth as pixel masks (causal_ie.data.ground_truth) and the localisation metrics on masks.

Rows come from the metadata torchxrayvision ships (SIIM-ACR's run-length csv with its
' EncodedPixels' column, VinDr-CXR's train.csv); DICOMs are written by the test at VinDr's real,
non-square sizes. Expected pixels are worked out by hand in the comments.
"""

from __future__ import annotations

import gzip
import os

import numpy as np
import pandas as pd
import pytest
import torch
from dicom_fixtures import write_dicom

from causal_ie.data.ground_truth import box_mask, combine_readers, resize_mask, rle_mask
from causal_ie.explain.metrics import (
    BoxLocalisation,
    EnergyPointingGame,
    PointingGame,
    SegmentationIoU,
    box_masks,
    ground_truth_masks,
)

xrv = pytest.importorskip("torchxrayvision")
XRV_DATA = os.path.join(os.path.dirname(xrv.__file__), "data")


def siim_rows() -> pd.DataFrame:
    with gzip.open(os.path.join(XRV_DATA, "siim-pneumothorax-train-rle.csv.gz"), "rt") as f:
        return pd.read_csv(f)


def test_rle_of_a_hand_drawn_mask():
    """A 5 x 4 mask drawn by hand; its runs go down the columns, each start counted from the end
    of the previous run:

        col:  0 1 2 3
        row0  . # . .      flat (column-major) indices of the pixels: 5, 6, 7 (col 1, rows 0-2),
        row1  . # . #      16, 17 (col 3, rows 1-2) and 14 (col 2, row 4)
        row2  . # . #      runs: (5, 3), (14, 1), (16, 2) -> starts 5, 14-8=6, 16-15=1
        row3  . . . .
        row4  . . # .
    """
    expected = torch.zeros(5, 4, dtype=torch.bool)
    expected[0:3, 1] = True
    expected[1:3, 3] = True
    expected[4, 2] = True
    assert torch.equal(rle_mask("5 3 6 1 1 2", (5, 4)), expected)
    assert not rle_mask(" -1", (5, 4)).any()
    with pytest.raises(ValueError, match="runs past the end"):
        rle_mask("18 3", (5, 4))
    with pytest.raises(ValueError, match="pairs"):
        rle_mask("5 3 6", (5, 4))


def test_siim_rows_decode_column_major_and_several_rows_unite():
    rows = siim_rows()
    assert " EncodedPixels" in rows.columns  # the real header's leading space
    # the second row starts at flat index 557374: column 557374 // 1024 = 544, row 557374 % 1024 = 318
    first = rows[" EncodedPixels"].iloc[1]
    assert first.split()[:2] == ["557374", "2"]
    mask = rle_mask(first)
    assert mask.shape == (1024, 1024)
    assert mask[318, 544] and mask[319, 544] and not mask[317, 544] and not mask[320, 544]
    assert not mask[544, 318]  # read row-major it would sit here
    # an image with several rows: one component each; the mask is their union
    counts = rows["ImageId"].value_counts()
    image = counts.index[0]
    assert counts.iloc[0] >= 2
    encodings = rows.loc[rows["ImageId"] == image, " EncodedPixels"].tolist()
    union = rle_mask(encodings)
    parts = [rle_mask(e) for e in encodings]
    assert torch.equal(union, torch.stack(parts).any(0))
    assert int(union.sum()) > max(int(p.sum()) for p in parts)  # keeping only the last row loses pixels


def test_vindr_box_scales_by_the_dicoms_own_rows_and_columns(tmp_path):
    """VinDr's Cardiomegaly row 9a5094b2... (x_min 691, y_min 1375, x_max 1653, y_max 1831) on a
    DICOM of 2880 rows x 2304 columns, scored at 64 x 64: columns scale by 64/2304, rows by
    64/2880. Columns hold centres in [19.19, 45.92): 19..45; rows in [30.56, 40.69): 31..40."""
    with gzip.open(os.path.join(XRV_DATA, "vinbigdata-train.csv.gz"), "rt") as f:
        vindr = pd.read_csv(f)
    row = vindr[(vindr.image_id == "9a5094b2563a1ef3ff50dc5c7ff71345") & (vindr.class_name == "Cardiomegaly")].iloc[0]
    path = write_dicom(tmp_path / f"{row.image_id}.dicom", np.zeros((2880, 2304), dtype=np.uint16))
    import pydicom

    header = pydicom.dcmread(path, stop_before_pixels=True)
    stored = (int(header.Rows), int(header.Columns))
    mask = box_mask((row.x_min, row.y_min, row.x_max, row.y_max), stored, (64, 64), corners=True)
    expected = torch.zeros(64, 64, dtype=torch.bool)
    expected[31:41, 19:46] = True
    assert torch.equal(mask, expected)
    swapped = box_mask((row.x_min, row.y_min, row.x_max, row.y_max), stored[::-1], (64, 64), corners=True)
    assert not torch.equal(swapped, expected)  # a box scaled by the wrong axis fails


def test_nih_box_is_in_the_1024_px_png_not_the_original_size():
    """NIH's BBox_List row of 00013118_008.png (Atelectasis, x 225.08, y 547.02, w 86.76, h 79.19)
    is in the 1024 px PNG's pixels; at 32 px columns hold centres in [7.03, 9.75): 7..9, rows in
    [17.09, 19.57): 17..19. Scaling by the CSV's OriginalImage size (2992 x 2991) would not."""
    with gzip.open(os.path.join(XRV_DATA, "BBox_List_2017.csv.gz"), "rt") as f:
        boxes = pd.read_csv(f)
    row = boxes[boxes["Image Index"] == "00013118_008.png"].iloc[0]
    xywh = tuple(float(v) for v in row.iloc[2:6])  # header "Bbox [x,y,w,h]" spreads over 4 columns
    assert xywh == pytest.approx((225.084746, 547.019217, 86.779661, 79.186441))
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[17:20, 7:10] = True
    assert torch.equal(box_mask(xywh, (1024, 1024), (32, 32)), expected)
    assert not torch.equal(box_mask(xywh, (2991, 2992), (32, 32)), expected)


def test_readers_combine_as_union_or_majority():
    a, b, c = (torch.zeros(1, 5, dtype=torch.bool) for _ in range(3))
    a[0, 0:3] = True  # reader 1: pixels 0-2
    b[0, 1:4] = True  # reader 2: pixels 1-3
    c[0, 2] = True  # reader 3: pixel 2
    assert combine_readers([a, b, c]).tolist() == [[True, True, True, True, False]]
    assert combine_readers([a, b, c], "majority").tolist() == [[False, True, True, False, False]]
    with pytest.raises(ValueError, match="data.readers='all'"):
        combine_readers([a], "all")


def test_resize_mask_takes_the_pixel_under_each_centre():
    mask = rle_mask("5 3 6 1 1 2", (5, 4))
    assert torch.equal(resize_mask(mask, (5, 4)), mask)
    up = resize_mask(mask, (10, 8))
    assert torch.equal(up[::2, ::2], mask) and torch.equal(up[1::2, 1::2], mask)


def test_metrics_score_a_mask_drawn_from_a_box_as_the_box():
    torch.manual_seed(0)
    maps = torch.rand(6, 20, 24)
    maps[1] = 0.0  # flat map: ties everywhere
    boxes = torch.tensor([[3, 4, 6, 5], [0, 0, 24, 20], [10.5, 2.25, 3.5, 7.75], [18, 15, 6, 5],
                          [5, 5, 1, 1], [0, 12, 12, 8]], dtype=torch.float64)
    masks = box_masks(boxes, 20, 24)
    assert torch.equal(PointingGame().pair_hits(maps, boxes), PointingGame().pair_hits(maps, masks))
    # grown by a tolerance, a pixel-aligned box and its mask cover the same pixels (a fractional
    # box keeps its sub-pixel edges, which its mask has lost)
    aligned = [0, 1, 3, 4, 5]
    for tolerance in (0.5, 1, 1.3, 2):
        grown = ground_truth_masks(boxes[aligned], 20, 24, tolerance)
        assert torch.equal(grown, ground_truth_masks(masks[aligned], 20, 24, tolerance)), tolerance
        hits = PointingGame(tolerance=tolerance).pair_hits
        assert torch.equal(hits(maps[aligned], boxes[aligned]), hits(maps[aligned], masks[aligned]))
    # by hand: the 1 x 1 box at (5, 5) grown by 1.3 covers centres in [3.7, 7.3): pixels 4..6
    assert ground_truth_masks(masks[4:5], 20, 24, 1.3)[0].nonzero().unique(dim=0)[:, 0].unique().tolist() == [4, 5, 6]
    for metric in (EnergyPointingGame, BoxLocalisation):
        on_boxes, on_masks = metric(), metric()
        on_boxes.update(maps, boxes), on_masks.update(maps, masks)
        left, right = on_boxes.compute(), on_masks.compute()
        if isinstance(left, dict):
            assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)
        else:
            assert torch.equal(left, right)
    with pytest.raises(ValueError, match=r"boxes \[P, 4\] or masks \[P, H, W\]"):
        PointingGame().update(maps, masks[:, :10])


def test_segmentation_iou_by_hand():
    """A 4 x 4 map 0..15 row by row, normalised by 15, binarised at 0.5: pixels 8..15 (rows 2-3).
    Ground truth rows 1-2: intersection 4 (row 2), union 12: IoU 1/3. A flat map predicts the
    whole image: IoU = 4/16 against a 4-pixel mask."""
    maps = torch.stack([torch.arange(16.0).reshape(4, 4), torch.zeros(4, 4)])
    truth = torch.zeros(2, 4, 4, dtype=torch.bool)
    truth[0, 1:3] = True
    truth[1, 0, :] = True
    metric = SegmentationIoU()
    assert metric.pair_ious(maps, truth).tolist() == pytest.approx([1 / 3, 1 / 4])
    metric.update(maps, truth)
    assert float(metric.compute()) == pytest.approx((1 / 3 + 1 / 4) / 2)
