"""ChestX-ray14 (NIH): metadata, radiologist boxes, splits, image files and the data set.

Reads the folder exactly as the NIH download unpacks:
``Data_Entry_2017_v2020.csv`` (or ``Data_Entry_2017.csv``, either ``.gz``),
``BBox_List_2017.csv``, ``train_val_list.txt`` / ``test_list.txt`` and the
images under ``images/`` or the tarballs' ``images_001/images/`` ...
Problems with the data (unknown labels, missing or unreadable images, ...) go
through a :class:`ProblemLog`: a clear DataError by default, counted and
skipped with ``on_error="skip"``. :func:`load_splits` reads the folder once for
all three splits, so a partial download (only some tarballs unpacked) is split
over the images that are there and its problems are counted and logged once.

The boxes of ``BBox_List_2017.csv`` are in pixels of the distributed PNG
(1024 x 1024). ``OriginalImage[Width,Height]`` of the metadata is the scan's
size before NIH resized it (about 2,500-3,000 px), so it is not used: boxes
are scaled by each PNG's own size, recorded when the image cache is built.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import math
import mmap
import os
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from causal_ie.data.cache import build_cache, default_cache_dir
from causal_ie.data.errors import DataError, ProblemLog, read_table
from causal_ie.data.findings import ALIASES, FINDINGS, NUM_FINDINGS
from causal_ie.data.splits import patient_split

log = logging.getLogger(__name__)

METADATA_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
BBOX_NAME = "BBox_List_2017.csv"
TRAIN_VAL_LIST, TEST_LIST = "train_val_list.txt", "test_list.txt"
NO_FINDING = "No Finding"
PNG_SIZE = 1024  # the distributed NIH PNGs are 1024 x 1024
SPLITS = ("train", "val", "test")

_EXPECTED_CONTENT = (
    f"{METADATA_NAMES[0]} (or {METADATA_NAMES[1]}), {BBOX_NAME}, {TRAIN_VAL_LIST}, {TEST_LIST} "
    "and the PNGs under images/ or images_001/images/ ... images_012/images/"
)
_METADATA_COLUMNS = {"Image Index": "image", "Finding Labels": "labels", "Patient ID": "patient_id", "View Position": "view"}


# -- files -------------------------------------------------------------------
def check_root(root: str | Path) -> Path:
    """``data.root`` as a Path, or DataError when the NIH folder is not there."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"the NIH ChestX-ray14 folder {root} (data.root) does not exist; it should contain {_EXPECTED_CONTENT}")
    return root


def _find_file(root: Path, names: Iterable[str]) -> Path | None:
    """The first of ``names`` (each also as ``.gz``) present in ``root``."""
    for name in names:
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _looked_for(names: Iterable[str]) -> str:
    return ", ".join(f"{n} / {n}.gz" for n in names)


# -- metadata ----------------------------------------------------------------
def read_metadata(root: str | Path, on_error: str = "raise", *, problems: ProblemLog | None = None) -> pd.DataFrame:
    """One row per image of ``Data_Entry_2017[_v2020].csv``.

    Columns: ``image`` (file name), ``patient_id`` (str), ``view`` (PA/AP),
    then one 0/1 int column per finding, named and ordered as FINDINGS.
    ``No Finding`` gives all zeros; NIH spellings such as ``Infiltrate`` are
    mapped to FINDINGS names. Unknown labels and duplicate rows raise a
    DataError naming the file, row and label, or with ``on_error="skip"`` drop
    the row and are counted (pass ``problems`` to collect them yourself).
    """
    own_log = problems is None
    problems = problems if problems is not None else ProblemLog(on_error)
    entries, _, _ = _load_entries(check_root(root), problems)
    if own_log:
        problems.log_summary()
    return entries[["image", "patient_id", "view", *FINDINGS]]


def _load_entries(root: Path, problems: ProblemLog) -> tuple[pd.DataFrame, Path, list[str]]:
    """The metadata as :func:`read_metadata` (good rows only), the file read and the image
    name of every data row (dropped rows too, so they are not reported a second time)."""
    path = _find_file(root, METADATA_NAMES)
    if path is None:
        raise DataError(f"no NIH metadata file in {root}: looked for {_looked_for(METADATA_NAMES)}")
    raw = read_table(path, "NIH metadata file", dtype=str, keep_default_na=False)
    raw.columns = [str(c).strip() for c in raw.columns]
    missing = [c for c in _METADATA_COLUMNS if c not in raw.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; expected the NIH header "
            "'Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,...', "
            f"found {', '.join(raw.columns)}"
        )
    images = raw["Image Index"].str.strip()
    labels = raw["Finding Labels"].str.strip().str.replace(r"\s*\|\s*", "|", regex=True)
    line = raw.index.to_numpy() + 2  # 1-based file line: the header is line 1

    def where(i: int) -> str:
        return f"{path} line {line[i]} (image {images.iloc[i] or '<empty>'})"

    bad = np.zeros(len(raw), dtype=bool)
    for i in np.flatnonzero((images == "").to_numpy()):
        problems.report("row without image name", where(i), "empty 'Image Index'")
        bad[i] = True
    for i in np.flatnonzero((labels == "").to_numpy()):
        problems.report("unknown label", where(i), f"empty 'Finding Labels'; write '{NO_FINDING}' for an image without findings")
        bad[i] = True

    dummies = labels.str.get_dummies(sep="|")
    counts = pd.DataFrame(0, index=raw.index, columns=list(FINDINGS), dtype=np.int64)
    unknown: list[tuple[int, str]] = []
    for label in dummies.columns:
        if label in ("", NO_FINDING):
            continue
        canonical = ALIASES.get(label, label)
        if canonical in FINDINGS:
            counts[canonical] += dummies[label].to_numpy()
        else:
            unknown += [(int(i), label) for i in np.flatnonzero(dummies[label].to_numpy())]
    valid_names = ", ".join((NO_FINDING, *FINDINGS))
    for i, label in sorted(unknown):
        problems.report("unknown label", where(i), f"label {label!r}; valid labels: {valid_names}")
        bad[i] = True

    # Duplicates among the rows still kept, so a dropped bad row does not shadow a good one.
    ok = np.flatnonzero(~bad)
    for i in ok[images.iloc[ok].duplicated(keep="first").to_numpy()]:
        problems.report("duplicate image row", where(i), "the image is listed before; keeping the first row")
        bad[i] = True

    out = pd.DataFrame(
        {
            "image": images,
            "patient_id": raw["Patient ID"].str.strip(),
            "view": raw["View Position"].str.strip(),
        }
    )
    # OriginalImage[Width,Height] is the scan before NIH resized it to the PNG: not the
    # frame of the boxes, so it is not read (the PNG's own size is, when it is decoded).
    out = pd.concat([out, counts.clip(upper=1)], axis=1)
    return out.loc[~bad].reset_index(drop=True), path, images.tolist()


# -- boxes -------------------------------------------------------------------
def read_bboxes(root: str | Path) -> pd.DataFrame:
    """The radiologist boxes of ``BBox_List_2017.csv``: one row per box.

    Columns ``image``, ``finding`` (a FINDINGS name; ``Infiltrate`` becomes
    ``Infiltration``), ``x``, ``y``, ``w``, ``h`` (float, pixels of the PNG as
    distributed, 1024 x 1024; not of ``OriginalImage[Width,Height]``). The
    file's header ``Image Index,Finding Label,Bbox [x,y,w,h],,,`` does not
    name the coordinate columns, so fields 3 to 6 are read by position. Raises DataError naming the file and line for an
    unknown finding or a value that is not a positive-size box.
    """
    root = check_root(root)
    path = _find_file(root, [BBOX_NAME])
    if path is None:
        raise DataError(f"no NIH box file in {root}: looked for {_looked_for([BBOX_NAME])}")
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", newline="", encoding="utf-8-sig") as f:
            text = f.read()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the NIH box file {path}: {exc}") from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or not rows[0] or rows[0][0].strip().lstrip("\ufeff") != "Image Index":
        raise DataError(f"{path} line 1: expected the header 'Image Index,Finding Label,Bbox [x,y,w,h],,,'")
    records = []
    valid_names = ", ".join(FINDINGS)
    for lineno, fields in enumerate(rows[1:], start=2):
        if not any(f.strip() for f in fields):
            continue  # blank line
        if len(fields) < 6:
            raise DataError(f"{path} line {lineno}: expected image, finding and 4 numbers x,y,w,h; got {len(fields)} field(s)")
        image, label = fields[0].strip(), fields[1].strip()
        finding = ALIASES.get(label, label)
        if finding not in FINDINGS:
            raise DataError(f"{path} line {lineno} (image {image}): unknown finding {label!r}; valid findings: {valid_names}")
        try:
            x, y, w, h = (float(v) for v in fields[2:6])
        except ValueError:
            raise DataError(f"{path} line {lineno} (image {image}): x,y,w,h must be numbers, got {fields[2:6]}") from None
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            raise DataError(f"{path} line {lineno} (image {image}): box {x},{y},{w},{h} needs finite values and w, h > 0")
        records.append((image, finding, x, y, w, h))
    df = pd.DataFrame(records, columns=["image", "finding", "x", "y", "w", "h"])
    return df.astype({c: np.float64 for c in "xywh"})


BOX_SLACK = 1.0  # px a box may reach past the PNG's edge (the real file's boxes all end inside 1024)


def _boxes_inside(boxes: pd.DataFrame, sizes: dict[str, np.ndarray], problems: ProblemLog) -> pd.DataFrame:
    """The boxes of images in ``sizes`` that lie inside their PNG ((width, height)); others reported.

    A box past the edge means the PNG is not in the frame of the box file (e.g.
    images resized by hand): scaling it by the PNG size would misplace it.
    """
    sub = boxes[boxes["image"].isin(sizes)]
    if sub.empty:
        return sub
    wh = np.stack([sizes[n] for n in sub["image"]]).astype(np.float64)
    outside = (
        (sub[["x", "y"]].to_numpy() < -BOX_SLACK).any(axis=1)
        | (sub["x"].to_numpy() + sub["w"].to_numpy() > wh[:, 0] + BOX_SLACK)
        | (sub["y"].to_numpy() + sub["h"].to_numpy() > wh[:, 1] + BOX_SLACK)
    )
    for (_, r), (w, h) in zip(sub[outside].iterrows(), wh[outside], strict=True):
        problems.report(
            "box outside its image",
            f"{BBOX_NAME} {r.image} {r.finding}",
            f"box x={r.x:g}, y={r.y:g}, w={r.w:g}, h={r.h:g} ends past the {int(w)}x{int(h)} PNG; the boxes are in "
            f"pixels of the distributed {PNG_SIZE} px PNGs, so the images must not be resized",
        )
    return sub[~outside]


def _box_array(boxes: pd.DataFrame | None, names: Sequence[str]) -> np.ndarray:
    """[N, 14, 4] boxes (x, y, w, h, PNG pixels) of ``names``; NaN where a finding has none.

    Where the file has several boxes of one finding on one image, the row is
    their enclosing box, so every annotated lesion lies inside it.
    """
    out = np.full((len(names), NUM_FINDINGS, 4), np.nan, dtype=np.float32)
    if boxes is None or boxes.empty:
        return out
    index = {n: i for i, n in enumerate(names)}
    sub = boxes[boxes["image"].isin(index)]
    if sub.empty:
        return out
    corners = sub.assign(x1=sub.x + sub.w, y1=sub.y + sub.h)
    merged = corners.groupby(["image", "finding"], sort=False).agg(x=("x", "min"), y=("y", "min"), x1=("x1", "max"), y1=("y1", "max"))
    for (image, finding), r in merged.iterrows():
        out[index[image], FINDINGS.index(finding)] = (r.x, r.y, r.x1 - r.x, r.y1 - r.y)
    return out


# -- splits ------------------------------------------------------------------
def _read_list(path: Path) -> list[str]:
    try:
        return [s for s in (line.strip() for line in path.read_text().splitlines()) if s]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the split file {path}: {exc}") from None


def read_official_split(root: str | Path) -> tuple[list[str], list[str]] | None:
    """The official patient-wise split as (train_val, test) image names, or None without the files.

    Raises DataError when only one of ``train_val_list.txt`` / ``test_list.txt``
    is present or an image is listed in both.
    """
    root = check_root(root)
    train_val_file, test_file = root / TRAIN_VAL_LIST, root / TEST_LIST
    present = (train_val_file.is_file(), test_file.is_file())
    if not any(present):
        return None
    if not all(present):
        missing = test_file if present[0] else train_val_file
        raise DataError(f"{missing} is missing while its counterpart exists; provide both split lists or neither")
    train_val, test = _read_list(train_val_file), _read_list(test_file)
    both = sorted(set(train_val) & set(test))
    if both:
        raise DataError(f"{len(both)} image(s) listed in both {train_val_file} and {test_file}, e.g. {', '.join(both[:5])}")
    return train_val, test


def make_splits(
    root: str | Path,
    metadata: pd.DataFrame,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    *,
    problems: ProblemLog | None = None,
    available: Collection[str] | None = None,
    listed: Collection[str] | None = None,
) -> dict[str, list[str]]:
    """Image names of the train / val / test splits.

    With the official lists, test is ``test_list.txt`` and validation takes
    ``val_fraction`` of the ``train_val_list.txt`` images, patient-wise
    (``test_fraction`` is then unused). Without them the whole metadata is
    split patient-wise into 1 - val - test, val and test fractions. Images in
    a split file but not in the metadata are reported to ``problems``.
    ``available`` (default: every metadata image) restricts the splits to the
    images that can be served, before validation is drawn, so a partial
    download still gets about ``val_fraction`` of its own images for validation.
    ``listed`` (default: the images of ``metadata``) are the names the metadata
    file lists, rows dropped for a problem included: those are not reported again.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must be in [0, 1) and sum below 1"
        )
    root = check_root(root)
    problems = problems if problems is not None else ProblemLog("raise")
    official = read_official_split(root)
    usable = metadata if available is None else metadata[metadata["image"].isin(set(available))]
    if official is None:
        return patient_split(usable, {"train": 1 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}, seed)
    known = set(metadata["image"]) if listed is None else set(listed) | set(metadata["image"])
    servable = set(usable["image"])
    kept = []
    for names, file in zip(official, (TRAIN_VAL_LIST, TEST_LIST), strict=True):
        for name in names:
            if name not in known:
                problems.report("image in split file but not in metadata", name, f"listed in {root / file}")
        kept.append([n for n in names if n in servable])
    train_val = usable[usable["image"].isin(set(kept[0]))]
    sub = patient_split(train_val, {"train": 1 - val_fraction, "val": val_fraction}, seed)
    return {"train": sub["train"], "val": sub["val"], "test": kept[1]}


# -- image files -------------------------------------------------------------
def image_dirs(root: str | Path) -> list[Path]:
    """The image folders of an NIH root: ``images/`` and the tarballs' ``images_0NN/images/``, those present."""
    root = Path(root).expanduser()
    dirs = [root / "images"] + sorted(p / "images" for p in root.glob("images_*") if p.is_dir())
    return [d for d in dirs if d.is_dir()]


def image_index(dirs: Iterable[Path]) -> dict[str, Path]:
    """File name -> path over the image folders ``dirs``, each listed once (no per-file stat);
    the first folder wins on duplicates."""
    index: dict[str, Path] = {}
    for d in dirs:
        with os.scandir(d) as entries:
            for entry in entries:
                index.setdefault(entry.name, Path(entry.path))
    return index


def find_images(root: str | Path, names: Iterable[str], problems: ProblemLog) -> dict[str, Path]:
    """Paths of the image files ``names`` under ``root/images/`` or ``root/images_0NN/images/``.

    Each folder is listed once (no per-file stat). Names not found are
    reported to ``problems`` as "missing image" and left out of the result.
    When none of ``names`` is found, a DataError names the folders searched,
    whatever ``on_error`` says: there is nothing to skip to.
    """
    root = check_root(root)
    names = list(names)
    dirs = image_dirs(root)
    expected = f"{root / 'images'}/*.png or {root / 'images_001' / 'images'}/*.png ... (the NIH tarballs unpacked in {root})"
    if not dirs:
        raise DataError(f"no image folder in {root}: expected {expected}")
    index = image_index(dirs)
    found = {name: index[name] for name in names if name in index}
    searched = ", ".join(str(d) for d in dirs)
    if names and not found:
        pngs = sum(n.lower().endswith(".png") for n in index)
        raise DataError(
            f"none of the {len(names)} listed images (e.g. {names[0]}) is in the image folder(s) searched: {searched} "
            f"({pngs} PNG file(s) there with other names); expected {expected}"
        )
    missing = [name for name in names if name not in found]
    for name in missing:
        problems.report("missing image", name, f"not in {searched}; {len(missing)} of the {len(names)} listed images are missing")
    return found


# -- data set ----------------------------------------------------------------
class NIHDataset(Dataset):
    """ChestX-ray14 images with labels and radiologist boxes, as sample dicts.

    Args:
        images: uint8 [M, S, S] resized images, typically the cache memory map.
        labels: [N, 14] 0/1 in FINDINGS order.
        ids: N image file names.
        patient_ids: N patient ids.
        boxes: [N, 14, 4] (x, y, w, h) in pixels of the image FILE (the
            1024 px PNG for NIH), NaN where a finding has no box; None for no boxes.
        file_sizes: [N, 2] (width, height) of the image files the boxes'
            pixels refer to, used to scale the boxes to S; default 1024 x 1024.
            Not the metadata's OriginalImage size (the scan before resizing).
        rows: [N] row of ``images`` holding item i (so skipped files need no
            copy of the cache); default 0..N-1.

    An item is ``{"image": float32 [1, S, S] in [0, 1], "labels": float32
    [14], "boxes": float32 [14, 4] in pixels of the returned image, "id",
    "patient_id"}``.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        ids: Sequence[str],
        patient_ids: Sequence[str],
        boxes: np.ndarray | None = None,
        file_sizes: np.ndarray | None = None,
        rows: np.ndarray | None = None,
    ):
        n = len(ids)
        if images.ndim != 3 or images.dtype != np.uint8 or images.shape[1] != images.shape[2]:
            raise ValueError(f"NIHDataset: images must be uint8 [M, S, S], got {images.dtype} {images.shape}")
        self.labels = np.asarray(labels, dtype=np.float32)
        if self.labels.shape != (n, NUM_FINDINGS):
            raise ValueError(f"NIHDataset: labels must be [{n}, {NUM_FINDINGS}] for {n} ids, got {self.labels.shape}")
        if len(patient_ids) != n:
            raise ValueError(f"NIHDataset: {len(patient_ids)} patient_ids for {n} ids")
        self.rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
        if self.rows.shape != (n,) or (n and (self.rows.min() < 0 or self.rows.max() >= len(images))):
            raise ValueError(f"NIHDataset: rows must be {n} indices into the {len(images)} images")
        self.images = images
        self.ids = list(ids)
        self.patient_ids = [str(p) for p in patient_ids]
        self.image_size = int(images.shape[1])
        if boxes is None:
            boxes = np.full((n, NUM_FINDINGS, 4), np.nan, np.float32)
        boxes = np.asarray(boxes, dtype=np.float32)
        if boxes.shape != (n, NUM_FINDINGS, 4):
            raise ValueError(f"NIHDataset: boxes must be [{n}, {NUM_FINDINGS}, 4], got {boxes.shape}")
        if file_sizes is None:
            file_sizes = np.full((n, 2), PNG_SIZE)
        file_sizes = np.asarray(file_sizes, dtype=np.float64)
        if file_sizes.shape != (n, 2) or (file_sizes <= 0).any():
            raise ValueError(f"NIHDataset: file_sizes must be [{n}, 2] positive (width, height), got {file_sizes.shape}")
        self.file_sizes = file_sizes.astype(np.int64)
        # Boxes in pixels of the S x S image: x and w scale with width, y and h with height.
        scale = (self.image_size / file_sizes).astype(np.float32)  # [N, 2]
        self.boxes = boxes * np.concatenate([scale, scale], axis=1)[:, None, :]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = np.asarray(self.images[self.rows[i]], dtype=np.float32) / 255.0
        return {
            "image": torch.from_numpy(image)[None],
            "labels": torch.from_numpy(self.labels[i].copy()),
            "boxes": torch.from_numpy(self.boxes[i].copy()),
            "id": self.ids[i],
            "patient_id": self.patient_ids[i],
        }

    # A memory map pickled by value would copy the whole cache into every
    # spawned DataLoader worker; send its file name and reopen it instead.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        images = self.images
        # Only a whole-file map (base is the mmap itself) can be reopened from its name alone.
        if isinstance(images, np.memmap) and images.filename is not None and isinstance(images.base, mmap.mmap):
            state["images"] = ("memmap", images.filename, images.shape, images.offset)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        images = state["images"]
        if isinstance(images, tuple) and images[0] == "memmap":
            _, filename, shape, offset = images
            state["images"] = np.memmap(filename, dtype=np.uint8, mode="r", shape=shape, offset=offset)
        self.__dict__.update(state)

    @classmethod
    def from_root(
        cls,
        root: str | Path,
        split: str,
        image_size: int,
        cache_dir: str | Path | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        on_error: str = "raise",
        boxes_only: bool = False,
    ) -> NIHDataset:
        """The ``split`` of the NIH folder ``root`` at ``image_size`` pixels (see :func:`load_splits`).

        ``boxes_only`` keeps only images with at least one radiologist box.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        data = load_splits(
            root, image_size, cache_dir, val_fraction, test_fraction, seed, on_error, boxes_only=(split,) if boxes_only else ()
        )
        return data.datasets[split]


@dataclass
class NIHSplits:
    """The three splits of one NIH folder and the report of what was read and skipped."""

    datasets: dict[str, NIHDataset]
    report: dict[str, Any] = field(default_factory=dict)


def load_splits(
    root: str | Path,
    image_size: int,
    cache_dir: str | Path | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    on_error: str = "raise",
    *,
    boxes_only: Collection[str] = (),
) -> NIHSplits:
    """Train, val and test of the NIH folder ``root`` at ``image_size`` pixels, read once.

    Reads the metadata, finds the listed image files, decodes the ones found
    once into the cache under ``cache_dir`` (default :func:`default_cache_dir`),
    splits the images that could be read (official lists when present, else
    patient-wise by ``seed``; validation is drawn from them patient-wise) and
    attaches the boxes, scaled by each PNG's own size. Splits named in
    ``boxes_only`` keep only images with a radiologist box (the localisation
    test set). Problems raise DataError, or with ``on_error="skip"`` are left
    out, logged once as a summary and counted in ``report`` (see
    :func:`_report`). No image found at all is an error either way.
    """
    unknown = set(boxes_only) - set(SPLITS)
    if unknown:
        raise ValueError(f"boxes_only names unknown split(s) {sorted(unknown)}; splits are {SPLITS}")
    if int(image_size) < 1:
        raise ValueError(f"data.image_size must be >= 1, got {image_size}")
    root = check_root(root)
    problems = ProblemLog(on_error)
    entries, metadata_file, listed = _load_entries(root, problems)
    # Boxes are optional for training, required for the localisation set.
    boxes = read_bboxes(root) if boxes_only or _find_file(root, [BBOX_NAME]) else None
    paths = find_images(root, entries["image"], problems)
    names = [n for n in entries["image"] if n in paths]
    cache = build_cache(
        [paths[n] for n in names], int(image_size), Path(cache_dir) if cache_dir else default_cache_dir(root), problems
    )
    row_of = {n: i for i, n in enumerate(names) if cache.valid[i]}
    if not row_of:
        raise DataError(f"none of the {len(names)} image file(s) found under {root} could be decoded: {problems.summary()}")
    if boxes is not None:
        boxes = _boxes_inside(boxes, {n: cache.sizes[i] for n, i in row_of.items()}, problems)
    splits = make_splits(root, entries, val_fraction, test_fraction, seed, problems=problems, available=row_of, listed=listed)
    with_box = set() if boxes is None else set(boxes["image"])
    by_image = entries.set_index("image")
    datasets = {}
    for split in SPLITS:
        kept = [n for n in splits[split] if n in with_box] if split in boxes_only else splits[split]
        rows = np.array([row_of[n] for n in kept], dtype=np.int64)
        sel = by_image.loc[kept]
        datasets[split] = NIHDataset(
            cache.images,
            labels=sel[list(FINDINGS)].to_numpy(np.float32),
            ids=kept,
            patient_ids=sel["patient_id"].tolist(),
            boxes=_box_array(boxes, kept),
            file_sizes=cache.sizes[rows],
            rows=rows,
        )
    problems.log_summary()
    report = _report(root, metadata_file, len(listed), len(paths), len(row_of), problems, datasets, on_error, boxes_only)
    for split, ds in datasets.items():
        log.info("NIH %s split: %d images of %d patients", split, len(ds), len(set(ds.patient_ids)))
    return NIHSplits(datasets, report)


def _report(
    root: Path,
    metadata_file: Path,
    listed: int,
    found: int,
    readable: int,
    problems: ProblemLog,
    datasets: dict[str, NIHDataset],
    on_error: str,
    boxes_only: Collection[str],
) -> dict[str, Any]:
    """What :func:`load_splits` read, served and skipped, JSON-ready (ints, strs, lists of strs).

    ``images_listed``: data rows of the metadata file; ``images_found``: listed
    images (with a valid row) whose file is in an image folder;
    ``images_readable``: those decoded; ``images_used``: those in a split;
    ``images_skipped``: rows left out for a problem (listed - readable);
    ``skipped`` / ``skipped_examples``: problems by kind (``missing image``,
    ``unreadable image``, ``unknown label``, ``duplicate image row``, ``box
    outside its image``, ...) with the first few items; ``splits``: images,
    patients and box images per split.
    """
    official = (root / TRAIN_VAL_LIST).is_file()
    used = sum(len(ds) for ds in datasets.values())
    return {
        "source": "nih",
        "root": str(root),
        "metadata_file": metadata_file.name,
        "image_folders": [str(d.relative_to(root)) for d in image_dirs(root)],
        "on_error": on_error,
        "split": "official lists" if official else "patient-wise by seed",
        "boxes_only": sorted(boxes_only),
        "images_listed": int(listed),
        "images_found": int(found),
        "images_readable": int(readable),
        "images_used": int(used),
        "images_skipped": int(listed - readable),
        **problems.as_dict(),
        "splits": {
            split: {
                "images": len(ds),
                "patients": len(set(ds.patient_ids)),
                "with_boxes": int((~np.isnan(ds.boxes).all(axis=(1, 2))).sum()) if len(ds) else 0,
            }
            for split, ds in datasets.items()
        },
    }
