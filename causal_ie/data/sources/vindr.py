"""``data=vindr``: VinDr-CXR's DICOMs and its three readers' boxes, as per-label masks."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch.utils.data import Dataset, Subset

from causal_ie.data.cache import build_cache
from causal_ie.data.datamodule import SPLITS, CXRDataModule, data_root
from causal_ie.data.errors import DataError, ProblemLog
from causal_ie.data.ground_truth import READER_RULES
from causal_ie.validators import choice

log = logging.getLogger(__name__)


class VinDrDataModule(CXRDataModule):
    """VinDr-CXR's images split by seed (the Kaggle set has no official split and no patient
    ids: image-wise), labelled by torchxrayvision's reader, decoded once into the image cache
    (:mod:`causal_ie.data.vindr`).

    Args:
        root: the folder holding ``train.csv`` and ``train/<image_id>.dicom``.
        readers: how the 3 readers' boxes combine into a mask: ``any`` (union) or ``majority``.
        cache_dir: where the resized images are cached (memmap).
        val_fraction, test_fraction: the splits' shares of the images.
        **settings: the shared datamodule settings (:class:`CXRDataModule`).
    """

    source = "vindr"

    def __init__(
        self,
        root: str | None = None,
        readers: str = "any",
        cache_dir: str | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        **settings: Any,
    ):
        super().__init__(**settings)
        self.root = data_root(root, self.source)
        self.readers = choice("data.readers", readers, READER_RULES)
        self.cache_dir = cache_dir
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self._splits: dict[str, Dataset] | None = None
        self._report: dict[str, Any] = {}
        self._read_labels()

    def _read_labels(self) -> None:
        from causal_ie.data import vindr

        self._annotation_file = vindr.annotation_file(self.root)
        self._annotations = vindr.read_annotations(self._annotation_file)
        self._reader = vindr.xrv_dataset(self.root, self._annotation_file)
        self.labels = vindr.label_space(self._reader)

    def splits(self) -> dict[str, Dataset]:
        """All three splits, read once (the DICOMs decoded into the cache on the first run)."""
        if self._splits is None:
            self._splits = self._read()
        return self._splits

    def _read(self) -> dict[str, Dataset]:
        from causal_ie.data import vindr
        from causal_ie.data.nih import default_cache_dir, patient_split

        root = Path(self.root).expanduser()
        problems = ProblemLog(self.on_error)
        ids = self._reader.csv["image_id"].astype(str).tolist()
        paths = [root / vindr.IMAGE_FOLDER / f"{i}{vindr.SUFFIX}" for i in ids]
        found = [p.is_file() for p in paths]
        for p, ok in zip(paths, found):
            if not ok:
                problems.report("missing image", str(p))
        present = [i for i, ok in enumerate(found) if ok]
        if not present:
            raise DataError(f"none of the {len(ids)} VinDr-CXR images of {self._annotation_file.name} is in "
                            f"{root / vindr.IMAGE_FOLDER} (as <image_id>{vindr.SUFFIX})")
        cache = build_cache([paths[i] for i in present], self.image_size,
                            Path(self.cache_dir) if self.cache_dir else default_cache_dir(root) / "vindr", problems)
        readable = [(i, row) for row, i in enumerate(present) if cache.valid[row]]
        if not readable:
            raise DataError(f"none of the {len(present)} VinDr-CXR DICOMs under {root} could be decoded: {problems.summary()}")
        order = [i for i, _ in readable]
        table = pd.DataFrame({"image": [ids[i] for i in order], "patient_id": [ids[i] for i in order]})
        fractions = {"train": 1 - self.val_fraction - self.test_fraction, "val": self.val_fraction, "test": self.test_fraction}
        chosen = patient_split(table, fractions, self.seed)
        position = {ids[i]: (i, row) for i, row in readable}
        datasets = {}
        for split in SPLITS:
            names = chosen[split]
            items = [position[n] for n in names]
            sizes = cache.sizes[[row for _, row in items]] if items else np.zeros((0, 2), np.int64)
            boxes = vindr.box_rows(self._annotations, self.labels, {n: k for k, n in enumerate(names)}, sizes, problems)
            ds = vindr.VinDrDataset(cache.images, np.array([row for _, row in items], dtype=np.int64),
                                    self._reader.labels[[i for i, _ in items]].reshape(len(items), len(self.labels)),
                                    names, sizes, boxes, self.readers)
            if split == "test" and self.test_boxes_only:
                ds = Subset(ds, np.flatnonzero(ds.has_ground_truth()).tolist())
            datasets[split] = ds
        problems.log_summary()
        self._report = {
            "source": self.source, "root": str(root), "metadata_file": str(self._annotation_file.relative_to(root)),
            "on_error": self.on_error, "split": "image-wise by seed (no patient ids)", "readers": self.readers,
            "boxes_only": ["test"] if self.test_boxes_only else [],
            "images_listed": len(ids), "images_found": len(present), "images_readable": len(readable),
            "images_used": len(readable), "images_skipped": len(ids) - len(readable), **problems.as_dict(),
            "splits": {s: self._split_counts(ds) for s, ds in datasets.items()},
        }
        return datasets

    @staticmethod
    def _split_counts(ds: Dataset) -> dict[str, int]:
        idx = list(range(len(ds)))
        base = ds
        while isinstance(base, Subset):  # test_boxes_only, then test_subset
            idx = [base.indices[i] for i in idx]
            base = base.dataset
        return {"images": len(idx), "patients": len(idx), "with_boxes": int(base.has_ground_truth()[idx].sum()) if idx else 0}

    def prepare_data(self) -> None:
        self.splits()

    def build_split(self, split: str) -> Dataset:
        return self.splits()[split]

    def source_report(self) -> dict[str, Any]:
        import copy

        self.splits()
        return copy.deepcopy(self._report)

    def subset_report(self, test: dict[str, Any]) -> None:
        served = self.served_test()
        test.update(self._split_counts(served))
