"""``data=nih``: ChestX-ray14 as the NIH download unpacks, with its radiologists' boxes."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from causal_ie.data.datamodule import CXRDataModule, data_root


class NIHDataModule(CXRDataModule):
    """The NIH folder's splits (official lists when present, else patient-wise by seed),
    read once for all three (:func:`causal_ie.data.nih.load_splits`).

    Args:
        root: the ChestX-ray14 folder.
        cache_dir: where the resized images are cached (memmap).
        val_fraction: share of the train_val images held out for validation, patient-wise.
        test_fraction: test share, used only without the official lists.
        **settings: the shared datamodule settings (:class:`CXRDataModule`).
    """

    source = "nih"

    def __init__(
        self,
        root: str | None = None,
        cache_dir: str | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        **settings: Any,
    ):
        super().__init__(**settings)
        self.root = data_root(root, self.source)
        self.cache_dir = cache_dir
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self._splits: Any = None  # NIHSplits: prepare_data and every setup share one read

    def splits(self) -> Any:
        """All NIH splits, read once, so the problems of a partial download are logged once."""
        if self._splits is None:
            from causal_ie.data.nih import load_splits

            self._splits = load_splits(
                self.root,
                self.image_size,
                cache_dir=self.cache_dir,
                val_fraction=self.val_fraction,
                test_fraction=self.test_fraction,
                seed=self.seed,
                on_error=self.on_error,
                boxes_only=("test",) if self.test_boxes_only else (),
            )
        return self._splits

    def prepare_data(self) -> None:
        # decode + resize once into the memmap cache (rank 0 only under DDP; the other
        # ranks read the finished cache in setup)
        self.splits()

    def build_split(self, split: str) -> Dataset:
        return self.splits().datasets[split]

    def source_report(self) -> dict[str, Any]:
        return copy.deepcopy(self.splits().report)

    def subset_report(self, test: dict[str, Any]) -> None:
        served = self.served_test()
        test["patients"] = len({served.dataset.patient_ids[i] for i in served.indices})
        boxes = served.dataset.boxes[list(served.indices)]
        test["with_boxes"] = int((~np.isnan(boxes).all(axis=(1, 2))).sum())

    def why_empty(self, split: str) -> str:
        r = self.data_report()
        why = (
            f": {r['images_listed']} images listed in {r['metadata_file']}, {r['images_found']} found in "
            f"{', '.join(r['image_folders'])}, {r['images_used']} used ({r['split']})"
        )
        if split in r["boxes_only"]:
            why += "; data.test_boxes_only=true keeps only images with a box in BBox_List_2017.csv, set it false to test on all"
        return why + ". With a partial download, unpack more images_0NN tarballs"
