"""What the data sets of image files (VinDr-CXR, RSNA, SIIM-ACR DICOMs; CheXpert JPEGs; NIH PNGs
with Google's labels) share: a catalogue of image files and labels, the files decoded once into
the memmap cache, seeded patient-wise splits (or the data set's own test split), and ground truth
drawn per item as per-label masks.

A source says what its folder holds (:meth:`FileSourceDataModule.catalogue`: ids, patients,
paths, labels) and how its ground truth is stored (:meth:`FileSourceDataModule.ground_truth`:
boxes, run-length masks); reading, caching, skipping bad files, splitting and the report are
the same for all of them, here.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Subset

from causal_ie.data.cache import build_cache, default_cache_dir
from causal_ie.data.datamodule import SPLITS, CXRDataModule, data_root
from causal_ie.data.errors import DataError, ProblemLog
from causal_ie.data.ground_truth import mask_boxes
from causal_ie.data.splits import patient_split

log = logging.getLogger(__name__)


@dataclass
class Catalogue:
    """What a folder lists: one entry per image, in a fixed order.

    ``labels`` [N, K] are 0/1 in the source's label space (NaN: unknown, e.g. an uncertain
    CheXpert label left out); ``split`` says how the splits are drawn, for the report;
    ``official_test`` (bool [N]) marks a data set's own test images (CheXpert's ``valid.csv``):
    they are the test split, and train and val are drawn from the rest."""

    ids: list[str]
    patient_ids: list[str]
    paths: list[Path]
    labels: np.ndarray
    metadata_file: Path
    split: str = "patient-wise by seed"
    official_test: np.ndarray | None = None


class GroundTruth(Protocol):
    """Per-label masks of the items of one split, drawn at the batch's size."""

    def masks(self, i: int, size: int) -> torch.Tensor:
        """bool [K, size, size]: each label's ground truth on item ``i`` (all False: none)."""

    def has(self) -> np.ndarray:
        """bool [N]: the items with any ground truth."""


class MaskedImages(Dataset):
    """Cached images with labels and, where the source has them, per-label masks.

    An item is ``{"image": float32 [1, S, S] in [0, 1], "labels": float32 [K], "masks": bool
    [K, S, S], "boxes": float32 [K, 4] (the masks' bounding boxes; NaN where a label has none),
    "id", "patient_id"}``; without ground truth ``masks`` is all False and ``boxes`` NaN. With
    ``draw=False`` an item has neither (a training split: drawing an image's masks costs 2-5 ms at
    224 px, over 100 times reading it (benchmarks/mask_drawing.py), and training does not use them)."""

    def __init__(self, images: np.ndarray, rows: np.ndarray, labels: np.ndarray, ids: Sequence[str],
                 patient_ids: Sequence[str], truth: GroundTruth | None, draw: bool = True):
        n = len(ids)
        self.images, self.rows = images, np.asarray(rows, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.float32)
        if self.rows.shape != (n,) or len(patient_ids) != n or self.labels.ndim != 2 or len(self.labels) != n:
            raise ValueError(f"MaskedImages: {n} ids need {n} rows, patient ids and label rows [n, K]")
        self.ids, self.patient_ids = [str(i) for i in ids], [str(p) for p in patient_ids]
        self.truth, self.draw = truth, bool(draw)
        self.image_size = int(images.shape[1])

    def __len__(self) -> int:
        return len(self.ids)

    def has_ground_truth(self) -> np.ndarray:
        return self.truth.has() if self.truth is not None else np.zeros(len(self), dtype=bool)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {
            "image": torch.from_numpy(np.asarray(self.images[self.rows[i]], dtype=np.float32) / 255.0)[None],
            "labels": torch.from_numpy(self.labels[i].copy()),
            "id": self.ids[i],
            "patient_id": self.patient_ids[i],
        }
        if not self.draw:
            return item
        if self.truth is not None:
            masks = self.truth.masks(i, self.image_size)
        else:
            masks = torch.zeros((self.labels.shape[1], self.image_size, self.image_size), dtype=torch.bool)
        return {**item, "masks": masks, "boxes": mask_boxes(masks)}


def _unwrap(ds: Dataset) -> tuple[MaskedImages, list[int]]:
    """The MaskedImages under Subsets (test_boxes_only, then test_subset) and the indices served."""
    idx = list(range(len(ds)))  # type: ignore[arg-type]
    while isinstance(ds, Subset):
        idx = [ds.indices[i] for i in idx]
        ds = ds.dataset
    return ds, idx  # type: ignore[return-value]


def _shown(path: Path, root: Path) -> str:
    """``path`` relative to the data folder, or whole when it lies elsewhere (a shipped copy)."""
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


class FileSourceDataModule(CXRDataModule):
    """A data set of image files (DICOM, PNG) under ``data.root``, read once into the cache.

    Args:
        root: the data set's folder, as its download unpacks.
        cache_dir: where the resized images are cached (memmap; default beside the data).
        val_fraction, test_fraction: the splits' shares of the images, drawn patient-wise by seed.
        train_masks: serve the training split's ground truth too (masks and boxes, moved by the
            augmentation with the image); off by default, as training does not use it and drawing
            it costs 2-5 ms per image with ground truth. Validation and test always carry it.
        **settings: the shared datamodule settings (:class:`~causal_ie.data.datamodule.CXRDataModule`).
    """

    def __init__(self, root: str | None = None, cache_dir: str | None = None, val_fraction: float = 0.1,
                 test_fraction: float = 0.2, train_masks: bool = False, **settings: Any):
        super().__init__(**settings)
        self.train_masks = bool(train_masks)
        self.root = data_root(root, self.source)
        self.cache_dir = cache_dir
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        if min(self.val_fraction, self.test_fraction) < 0 or self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must be >= 0 "
                             "and leave a training split (sum < 1)")
        self._splits: dict[str, Dataset] | None = None
        self._report: dict[str, Any] = {}

    # -- what a source provides ----------------------------------------------------
    def catalogue(self) -> Catalogue:
        """The folder's images, patients, files and labels (sets :attr:`labels` beforehand)."""
        raise NotImplementedError

    def ground_truth(self, ids: list[str], sizes: np.ndarray, problems: ProblemLog) -> GroundTruth | None:
        """The ground truth of the images ``ids`` (one split), whose files are stored at ``sizes``
        [n, 2] (columns, rows); None for a source without (labels only)."""
        return None

    def source_details(self) -> dict[str, Any]:
        """Source settings for the report (e.g. VinDr's ``readers``)."""
        return {}

    # -- reading -------------------------------------------------------------------
    def splits(self) -> dict[str, Dataset]:
        """All three splits, read once (the files decoded into the cache on the first run)."""
        if self._splits is None:
            self._splits = self._read()
        return self._splits

    def _read(self) -> dict[str, Dataset]:
        root = Path(self.root).expanduser()
        problems = ProblemLog(self.on_error)
        cat = self.catalogue()
        found = [p.is_file() for p in cat.paths]
        for p, ok in zip(cat.paths, found):
            if not ok:
                problems.report("missing image", str(p))
        present = [i for i, ok in enumerate(found) if ok]
        if not present:
            raise DataError(f"none of the {len(cat.ids)} images listed in {cat.metadata_file} is under {root} "
                            f"(e.g. {cat.paths[0] if cat.paths else 'no rows'})")
        cache_dir = Path(self.cache_dir) if self.cache_dir else default_cache_dir(root, self.source)
        cache = build_cache([cat.paths[i] for i in present], self.image_size, cache_dir, problems)
        readable = {i: row for row, i in enumerate(present) if cache.valid[row]}
        if not readable:
            raise DataError(f"none of the {len(present)} image files under {root} could be decoded: {problems.summary()}")
        order = list(readable)
        table = pd.DataFrame({"image": [cat.ids[i] for i in order], "patient_id": [cat.patient_ids[i] for i in order]})
        if cat.official_test is None:
            fractions = {"train": 1 - self.val_fraction - self.test_fraction, "val": self.val_fraction,
                         "test": self.test_fraction}
            chosen = patient_split(table, fractions, self.seed)
        else:  # the data set's own test split; val drawn patient-wise from the rest
            official = np.asarray(cat.official_test, dtype=bool)[order]
            chosen = patient_split(table[~official], {"train": 1 - self.val_fraction, "val": self.val_fraction},
                                   self.seed)
            chosen["test"] = table["image"][official].tolist()
        index_of = {cat.ids[i]: i for i in order}
        datasets: dict[str, Dataset] = {}
        boxes_only = self.test_boxes_only
        for split in SPLITS:
            items = [index_of[n] for n in chosen[split]]
            rows = np.array([readable[i] for i in items], dtype=np.int64)
            sizes = cache.sizes[rows] if len(rows) else np.zeros((0, 2), np.int64)
            ids = [cat.ids[i] for i in items]
            truth = self.ground_truth(ids, sizes, problems)
            ds: Dataset = MaskedImages(cache.images, rows, cat.labels[np.asarray(items, dtype=np.int64)], ids,
                                       [cat.patient_ids[i] for i in items], truth,
                                       draw=split != "train" or self.train_masks)
            if split == "test" and boxes_only and truth is None:
                # a labels-only source (CheXpert): every test image is scored for classification
                log.info("data.test_boxes_only has no effect on data=%s: it has no localisation ground truth",
                         self.source)
                boxes_only = False
            elif split == "test" and boxes_only:
                ds = Subset(ds, np.flatnonzero(ds.has_ground_truth()).tolist())
            datasets[split] = ds
        problems.log_summary()
        self._report = {
            "source": self.source, "root": str(root), "metadata_file": _shown(cat.metadata_file, root),
            "on_error": self.on_error, "split": cat.split, **self.source_details(),
            "boxes_only": ["test"] if boxes_only else [],
            "images_listed": len(cat.ids), "images_found": len(present), "images_readable": len(readable),
            "images_used": len(readable), "images_skipped": len(cat.ids) - len(readable), **problems.as_dict(),
            "splits": {s: self.split_counts(ds) for s, ds in datasets.items()},
        }
        for split, ds in datasets.items():
            log.info("%s %s split: %d images", self.source, split, len(ds))  # type: ignore[arg-type]
        return datasets

    @staticmethod
    def split_counts(ds: Dataset) -> dict[str, int]:
        base, idx = _unwrap(ds)
        has = base.has_ground_truth()
        return {"images": len(idx), "patients": len({base.patient_ids[i] for i in idx}),
                "with_boxes": int(has[idx].sum()) if idx else 0}

    # -- the datamodule's hooks ------------------------------------------------------
    def prepare_data(self) -> None:
        self.splits()

    def build_split(self, split: str) -> Dataset:
        return self.splits()[split]

    def source_report(self) -> dict[str, Any]:
        self.splits()
        return copy.deepcopy(self._report)

    def subset_report(self, test: dict[str, Any]) -> None:
        test.update(self.split_counts(self.served_test()))
