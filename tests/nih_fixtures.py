"""Miniature ChestX-ray14 and ChestMNIST folders in the exact real file formats.

``make_nih_root`` writes what the NIH download unpacks to: the metadata CSV
with its real header (the ``OriginalImage[Width,Height]`` cell split by the
comma), ``BBox_List_2017.csv`` with its three trailing empty header columns
and ``Infiltrate`` spelling, ``|``-joined labels with ``No Finding``, the
official split lists and PNGs named like ``00000001_000.png``. What was
written is available from ``nih_records`` and ``expected_pixels`` so tests
check parsed values against known ones.

As in the real download, ``OriginalImage[Width,Height]`` is the size of the
scan before NIH resized it (2,000-3,000 px here, never the PNG's size) and the
boxes are in pixels of the PNG as distributed. ``make_partial_nih_root``
writes what a user has after unpacking one tarball: 1024 px PNGs (one RGBA,
one 16-bit), most listed images absent, one truncated file.
"""

from __future__ import annotations

import gzip
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

METADATA_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
V2020_NAME, OLD_NAME = "Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv"

# Label strings cycled over the images: none, single, multi, every finding at least once.
LABEL_CYCLE = (
    "No Finding",
    "Cardiomegaly|Emphysema",
    "Effusion",
    "Infiltration|Nodule",
    "No Finding",
    "Mass",
    "Atelectasis|Effusion|Pneumothorax",
    "Pleural_Thickening",
    "Hernia",
    "Consolidation|Edema|Fibrosis",
    "Pneumonia",
    "No Finding",
)
# The 8 findings the NIH box file annotates, as that file spells them.
BOX_SPELLING = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Effusion": "Effusion",
    "Infiltration": "Infiltrate",
    "Mass": "Mass",
    "Nodule": "Nodule",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
}


@dataclass
class Record:
    """One image of the miniature data set, as written to the files."""

    index: int
    name: str
    patient: int
    followup: int
    labels: str
    # (finding as in FINDINGS, x, y, w, h) in pixels of the PNG file.
    boxes: list[tuple[str, float, float, float, float]] = field(default_factory=list)


def image_name(patient: int, followup: int) -> str:
    """NIH file name: 8-digit patient, 3-digit follow-up."""
    return f"{patient:08d}_{followup:03d}.png"


def original_image_size(index: int) -> tuple[int, int]:
    """The ``OriginalImage[Width,Height]`` written for image ``index``: a pre-resize scan size
    like the real file's (1,456 to 3,056 px), never the PNG's size."""
    return 2500 + (97 * index) % 557, 2048 + (131 * index) % 1009


def nih_records(n_patients: int = 12, images_per_patient: int = 3, png_size: int = 32) -> list[Record]:
    """The images ``make_nih_root`` writes, in metadata order, with their labels and boxes
    (in pixels of the ``png_size`` PNGs).

    Every other image with a boxable finding gets one box per such finding;
    the first boxed Nodule image gets a second Nodule box (the real file has
    images with several boxes).
    """
    records = []
    boxed = 0
    second_nodule = False
    for p in range(n_patients):
        for f in range(images_per_patient):
            k = len(records)
            labels = LABEL_CYCLE[k % len(LABEL_CYCLE)]
            rec = Record(k, image_name(p + 1, f), p + 1, f, labels)
            boxable = [lab for lab in labels.split("|") if lab in BOX_SPELLING]
            if boxable:
                if boxed % 2 == 0:
                    for j, finding in enumerate(boxable):
                        # Fractional coordinates like the real file's 225.084745762712.
                        s = png_size
                        rec.boxes.append((finding, 0.1 * s + j + 0.084745762712, 0.2 * s + 0.019216763771, 0.25 * s + 0.5, 0.3 * s + 0.25))
                        if finding == "Nodule" and not second_nodule:
                            rec.boxes.append((finding, 0.6 * s, 0.5 * s, 0.125 * s, 0.125 * s))
                            second_nodule = True
                boxed += 1
            records.append(rec)
    return records


def expected_pixels(index: int, size: int) -> np.ndarray:
    """The 8-bit gray content of image ``index`` (each file format must decode to this)."""
    yy, xx = np.mgrid[0:size, 0:size]
    return ((3 * yy + 5 * xx + 17 * index) % 256).astype(np.uint8)


def _write_png(path: Path, pixels: np.ndarray, kind: str, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "rgba":
        alpha = rng.integers(0, 256, pixels.shape, dtype=np.uint8)  # must be dropped, not blended
        Image.fromarray(np.stack([pixels, pixels, pixels, alpha], axis=-1)).save(path)
    elif kind == "16bit":
        Image.fromarray(pixels.astype(np.uint16) * 257).save(path)  # v * 257 is v on the 16-bit range
    else:
        Image.fromarray(pixels).save(path)


def _write_text(path: Path, text: str, gz: bool) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wt", newline="") as f:
            f.write(text)
    else:
        path.write_text(text, newline="")
    return path


def make_nih_root(
    tmp_path: Path,
    n_patients: int = 12,
    images_per_patient: int = 3,
    image_size: int = 32,
    layout: str = "images",
    gz: bool = False,
    official_split: bool = False,
    with_bboxes: bool = True,
    rgba: int = 0,
    sixteen_bit: int = 0,
    metadata_name: str = V2020_NAME,
    original_size: int | None = None,
    name: str = "nih",
) -> Path:
    """Write a miniature NIH ChestX-ray14 folder under ``tmp_path/name`` and return it.

    Args:
        layout: ``images`` (``images/*.png``) or ``tarball`` (``images_001/images/*.png``, ...).
        gz: write the CSV files as ``.csv.gz``.
        official_split: write ``train_val_list.txt`` / ``test_list.txt`` (last quarter of patients = test).
        rgba / sixteen_bit: how many of the first images are RGBA / 16-bit PNGs.
        metadata_name: ``Data_Entry_2017_v2020.csv`` or ``Data_Entry_2017.csv`` (the old file
            ends each line with an empty column, as released).
        original_size: the ``OriginalImage[Width,Height]`` written for every image; default a
            real-like pre-resize size per image (:func:`original_image_size`).
    """
    if layout not in ("images", "tarball"):
        raise ValueError(f"layout must be 'images' or 'tarball', got {layout!r}")
    root = Path(tmp_path) / name
    root.mkdir(parents=True)
    records = nih_records(n_patients, images_per_patient, image_size)
    trailing = "," if metadata_name == OLD_NAME else ""

    lines = [METADATA_HEADER + trailing]
    for r in records:
        width, height = (original_size, original_size) if original_size else original_image_size(r.index)
        lines.append(_metadata_line(r, width, height) + trailing)
    _write_text(root / metadata_name, "\n".join(lines) + "\n", gz)

    if with_bboxes:
        lines = [BBOX_HEADER]
        for r in records:
            for finding, x, y, w, h in r.boxes:
                lines.append(f"{r.name},{BOX_SPELLING[finding]},{x!r},{y!r},{w!r},{h!r},,,")
        _write_text(root / "BBox_List_2017.csv", "\n".join(lines) + "\n", gz)

    if official_split:
        n_test = max(1, n_patients // 4)
        test_patients = set(range(n_patients - n_test + 1, n_patients + 1))
        (root / "train_val_list.txt").write_text("".join(f"{r.name}\n" for r in records if r.patient not in test_patients))
        (root / "test_list.txt").write_text("".join(f"{r.name}\n" for r in records if r.patient in test_patients))

    rng = np.random.default_rng(0)
    per_folder = math.ceil(len(records) / 3)
    for r in records:
        kind = "rgba" if r.index < rgba else "16bit" if r.index < rgba + sixteen_bit else "gray"
        folder = root / "images" if layout == "images" else root / f"images_{r.index // per_folder + 1:03d}" / "images"
        _write_png(folder / r.name, expected_pixels(r.index, image_size), kind, rng)
    return root


def _metadata_line(r: Record, width: int, height: int) -> str:
    view = "PA" if r.index % 3 else "AP"
    gender = "M" if r.patient % 2 else "F"
    return f"{r.name},{r.labels},{r.followup},{r.patient},{40 + r.patient},{gender},{view},{width},{height},0.143,0.143"


@dataclass
class PartialImage:
    """One listed image of :func:`make_partial_nih_root` and what is on disk for it."""

    record: Record
    kind: str  # gray | rgba | 16bit | truncated | missing
    png_size: int  # side of the PNG written (boxes are in its pixels)
    split: str  # official list: train_val | test
    original: tuple[int, int]  # OriginalImage[Width,Height] in the CSV


# (patient, follow-up, labels, kind, png size, list, boxes in PNG pixels as (finding, x, y, w, h))
PARTIAL_LAYOUT = (
    (1, 0, "Infiltration", "gray", 1024, "test", [("Infiltration", 512.0, 256.0, 128.0, 64.0)]),
    (1, 1, "Effusion|Mass", "rgba", 1024, "test", [("Mass", 100.0, 200.0, 300.0, 400.0), ("Effusion", 600.0, 500.0, 200.0, 150.0)]),
    (2, 0, "No Finding", "16bit", 1024, "train_val", []),
    (2, 1, "Nodule", "missing", 1024, "train_val", []),
    (3, 0, "Cardiomegaly", "gray", 512, "train_val", []),
    (3, 1, "No Finding", "gray", 1024, "train_val", []),
    (4, 0, "Mass", "missing", 1024, "train_val", []),
    (4, 1, "No Finding", "missing", 1024, "train_val", []),
    (5, 0, "Atelectasis", "gray", 512, "test", [("Atelectasis", 10.5, 20.25, 300.0, 200.75)]),
    (5, 1, "Pneumothorax", "missing", 1024, "test", [("Pneumothorax", 700.0, 100.0, 150.0, 300.0)]),
    (6, 0, "Mass", "truncated", 1024, "train_val", []),
    (6, 1, "Pneumonia", "gray", 1024, "train_val", []),
    (7, 0, "No Finding", "gray", 1024, "train_val", []),
    (7, 1, "Hernia", "gray", 1024, "train_val", []),
    (8, 0, "Tumour", "gray", 1024, "train_val", []),  # a label NIH never uses: skipped as unknown
    (8, 1, "Edema", "missing", 1024, "train_val", []),
)


def make_partial_nih_root(tmp_path: Path, name: str = "nih_partial") -> tuple[Path, list[PartialImage]]:
    """An NIH folder as after unpacking only ``images_001.tar.gz``: all 16 rows listed in the
    real-format CSV, box file and split lists, but only some PNGs under ``images_001/images/``.

    On disk: 1024 px 8-bit gray PNGs, one RGBA and one 16-bit 1024 px PNG, two 512 px PNGs
    (boxes are in each PNG's own pixels) and one truncated PNG; 5 listed images are missing,
    one row has the unknown label ``Tumour``. The CSV's OriginalImage sizes are 2,500 x 2,048
    and up, as in the real file. Returns the folder and what was written, in CSV order.
    """
    root = Path(tmp_path) / name
    folder = root / "images_001" / "images"
    folder.mkdir(parents=True)
    images = []
    for index, (patient, followup, labels, kind, png_size, split, boxes) in enumerate(PARTIAL_LAYOUT):
        record = Record(index, image_name(patient, followup), patient, followup, labels, list(boxes))
        images.append(PartialImage(record, kind, png_size, split, original_image_size(index)))
    rng = np.random.default_rng(0)
    lines = [METADATA_HEADER] + [_metadata_line(im.record, *im.original) for im in images]
    (root / V2020_NAME).write_text("\n".join(lines) + "\n", newline="")
    lines = [BBOX_HEADER] + [
        f"{im.record.name},{BOX_SPELLING[f]},{x!r},{y!r},{w!r},{h!r},,," for im in images for f, x, y, w, h in im.record.boxes
    ]
    (root / "BBox_List_2017.csv").write_text("\n".join(lines) + "\n", newline="")
    for split, file in (("train_val", "train_val_list.txt"), ("test", "test_list.txt")):
        (root / file).write_text("".join(f"{im.record.name}\n" for im in images if im.split == split))
    for im in images:
        path = folder / im.record.name
        if im.kind == "missing":
            continue
        _write_png(path, expected_pixels(im.record.index, im.png_size), "gray" if im.kind == "truncated" else im.kind, rng)
        if im.kind == "truncated":  # cut inside the pixel data, as an interrupted download
            path.write_bytes(path.read_bytes()[:200])
    return root, images


def make_chestmnist_root(
    tmp_path: Path, size: int = 28, n: tuple[int, int, int] = (20, 6, 8), filename: str | None = None, name: str = "chestmnist"
) -> Path:
    """Write a MedMNIST-format ChestMNIST npz under ``tmp_path/name`` and return the folder.

    The file is ``chestmnist.npz`` for 28 px (as MedMNIST names it) and
    ``chestmnist_{size}.npz`` otherwise; images are uint8 [N, size, size],
    labels uint8 [N, 14], seeded.
    """
    root = Path(tmp_path) / name
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(size)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n, strict=True):
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = (rng.random((count, 14)) < 0.2).astype(np.uint8)
    filename = filename or ("chestmnist.npz" if size == 28 else f"chestmnist_{size}.npz")
    np.savez_compressed(root / filename, **arrays)
    return root
