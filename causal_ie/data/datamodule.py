"""The LightningDataModule every data source shares: splits, label alignment, loaders, DDP shards.

A data source is a subclass with its own ``_target_`` in ``conf/data/`` (:mod:`causal_ie.data.sources`):
it says how its splits are read (:meth:`CXRDataModule.build_split`), what label space its
labels are in and what it reports about itself; batching, augmentation, the model's label
space and sharding are the same for all of them, here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset

from causal_ie import validators
from causal_ie.data.errors import DataError
from causal_ie.data.findings import NIH14
from causal_ie.data.relabel import RelabelledDataset
from causal_ie.data.transforms import BoxAwareAugment, EmptyShard, IndexedDataset, TransformedDataset
from causal_ie.labels import LabelAlignment, LabelSpace, align

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
ON_ERROR = ("raise", "skip")


def data_root(root: str | None, source: str) -> str:
    """``data.root`` checked before anything compares the data with a checkpoint (sizes,
    labels): a missing folder is reported as such, not as a mismatch."""
    if root is None:
        raise DataError(f"data.root is required for data={source}: the folder holding the files")
    if not Path(root).expanduser().exists():
        raise DataError(f"data.root={str(root)!r} does not exist (data={source}: the folder holding the files)")
    return str(root)


class CXRDataModule(L.LightningDataModule):
    """Train/val/test splits of one data source, as batches of sample dicts.

    A batch holds ``image`` [B,1,S,S] in [0,1], ``labels`` [B,K] (1/0, NaN: unknown),
    ``boxes`` [B,K,4] (x, y, w, h in pixels of the batch image; NaN where a finding has
    no box) or, for sources whose ground truth is pixels, ``masks`` [B,K,S,S] (bool;
    all False where a finding has none), ``id`` and ``patient_id`` (lists of str). K labels
    of the source's :attr:`labels`, or of a model's label space after :meth:`align_labels`.

    A subclass sets :attr:`source` (its ``data=`` name) and :attr:`labels` and implements
    :meth:`build_split`; it may extend :meth:`prepare_data`, :meth:`data_report` and
    :meth:`why_empty`.

    Args:
        image_size: side of the square images fed to the model.
        augment: box-consistent random affine on the training split.
        test_boxes_only: test only on the images with radiologist ground truth (boxes or
            masks), where the source has it per image (NIH, VinDr-CXR; SyntheticCXR draws a
            box for every finding it places, ChestMNIST has none).
        test_subset: use only the first n test images (quick evaluations).
        on_error: ``raise`` (default) or ``skip`` missing/unreadable files
            (counted in :meth:`data_report`), where the source reads files.
    """

    source = "base"

    def __init__(
        self,
        image_size: int = 64,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        augment: bool = True,
        augment_translate: float = 0.05,
        augment_scale: tuple[float, float] = (0.95, 1.05),
        augment_degrees: float = 5.0,
        augment_hflip: float = 0.0,
        seed: int = 0,
        on_error: str = "raise",
        test_boxes_only: bool = False,
        test_subset: int | None = None,
    ):
        super().__init__()
        if int(image_size) < 8:
            raise ValueError(f"data.image_size must be >= 8, got {image_size}")
        if int(batch_size) < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.on_error = validators.choice("data.on_error", on_error, ON_ERROR)
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = pin_memory
        self.seed = int(seed)
        self.test_boxes_only = bool(test_boxes_only)
        if test_subset is not None and int(test_subset) < 1:
            raise ValueError(f"data.test_subset must be >= 1 or null, got {test_subset}")
        self.test_subset = None if test_subset is None else int(test_subset)
        self.labels: LabelSpace = NIH14
        self.alignment: LabelAlignment | None = None
        self.augmentation = (
            BoxAwareAugment(
                translate=augment_translate,
                scale=tuple(augment_scale),
                degrees=augment_degrees,
                hflip=augment_hflip,
            )
            if augment
            else None
        )
        self.datasets: dict[str, Dataset] = {}

    # -- what a source provides ------------------------------------------------
    def build_split(self, split: str) -> Dataset:
        """The data set of ``split`` in the source's own label space (:attr:`labels`)."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_split")

    def why_empty(self, split: str) -> str:
        """Why ``split`` came out empty, for the error (``": ..."``), where the source can tell."""
        return ""

    def source_report(self) -> dict[str, Any]:
        """What the source reports about its splits (results.json ``run.data``); by default the
        images of each split."""
        return {"source": self.source, "splits": {s: {"images": len(self._dataset(s, subset=False))} for s in SPLITS}}

    def subset_report(self, test: dict[str, Any]) -> None:
        """Recount, in ``test``, what a source counts per split (patients, images with ground
        truth) for the test images ``data.test_subset`` keeps (:meth:`served_test`)."""

    def served_test(self) -> Subset:
        """The test images ``data.test_subset`` keeps, as a Subset of the whole test split."""
        served = self._dataset("test")
        assert isinstance(served, Subset), "served_test is for a cut test split"
        return served

    # -- splits ------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, SPLITS):
            if split not in self.datasets:
                self._dataset(split)
                log.info("%s split of %s: %d images", split, self.source, len(self.datasets[split]))
                if len(self.datasets[split]) == 0:
                    raise DataError(
                        f"the {split} split of data={self.source} is empty (data.root={getattr(self, 'root', None)})"
                        f"{self.why_empty(split)}"
                    )

    def data_report(self) -> dict[str, Any]:
        """What the splits hold and what was skipped, as plain JSON-ready data (results.json ``run.data``).

        Always ``source`` and ``splits`` ({split: {"images": n served, ...}}, test after
        ``test_subset``, with ``images_before_subset`` where the subset cut it); each source
        adds its own counts (:meth:`source_report`)."""
        report = self.source_report()
        test = report["splits"]["test"]
        if self.test_subset is not None and self.test_subset < test["images"]:
            test["images_before_subset"] = test["images"]
            test["images"] = self.test_subset
            self.subset_report(test)
        return report

    @property
    def findings(self) -> tuple[str, ...]:
        """The names of the labels the batches hold (the model's after :meth:`align_labels`)."""
        return self.labels.names if self.alignment is None else self.alignment.model.names

    def align_labels(self, model_labels: LabelSpace) -> LabelAlignment:
        """Serve every split in ``model_labels``' order from now on (labels the data lacks are
        NaN, its labels the model lacks are dropped); the alignment, for results.json.

        Raises ValueError naming both spaces when they share no label."""
        alignment = align(self.labels, model_labels)
        if not alignment.scored:
            raise ValueError(
                f"the model's labels ({model_labels.name}: {', '.join(model_labels.names)}) share none with "
                f"data={self.source} ({self.labels.name}: {', '.join(self.labels.names)}): nothing to score"
            )
        self.alignment = None if alignment.identity else alignment
        return alignment

    def dataset(self, split: str) -> Dataset:
        """The (unaugmented) data set of ``split``, built on first use, in the model's label
        space after :meth:`align_labels`."""
        ds = self._dataset(split)
        return ds if self.alignment is None else RelabelledDataset(ds, self.alignment)

    def _dataset(self, split: str, subset: bool = True) -> Dataset:
        """The data set of ``split`` in the data's own label space (test: after ``test_subset``)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split not in self.datasets:
            ds = self.build_split(split)
            if split == "test" and self.test_subset is not None and self.test_subset < len(ds):
                ds = Subset(ds, range(self.test_subset))
            self.datasets[split] = ds
        ds = self.datasets[split]
        return ds.dataset if not subset and isinstance(ds, Subset) else ds

    def label_matrix(self, split: str = "train") -> np.ndarray:
        """All labels of a split as an (N, K) array (the model's K after :meth:`align_labels`),
        without decoding images."""
        ds = self._dataset(split)
        if isinstance(ds, Subset):
            labels = self.label_matrix_of(ds.dataset)[list(ds.indices)]
        else:
            labels = self.label_matrix_of(ds)
        if self.alignment is not None:
            labels = self.alignment.relabel(torch.as_tensor(labels, dtype=torch.float32))[0].numpy()
        return labels

    @staticmethod
    def label_matrix_of(ds: Dataset) -> np.ndarray:
        if hasattr(ds, "label_matrix"):
            return np.asarray(ds.label_matrix())
        if hasattr(ds, "labels"):
            return np.asarray(ds.labels)
        return np.stack([ds[i]["labels"].numpy() for i in range(len(ds))])

    def positive_weights(self) -> list[float]:
        """BCE pos_weight per finding: negatives / positives on the training split (unknown
        labels, NaN, count as neither)."""
        labels = self.label_matrix("train")
        pos = np.nansum(labels, 0)
        neg = (labels == 0).sum(0)
        return (neg / np.maximum(pos, 1)).astype(float).tolist()

    # -- loaders -------------------------------------------------------------
    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        ds = self.dataset(split)
        if split == "train" and self.augmentation is not None:
            ds = TransformedDataset(ds, self.augmentation)
        if split == "test":  # batches name their images by index in dataset("test")
            ds = IndexedDataset(ds)
        sampler = None
        if split == "test" and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_rank() >= len(ds):  # fewer images than processes: this one scores none
                ds = EmptyShard(ds)
            else:  # shard without padding duplicates, so sharded test metrics equal one process's
                sampler = UnrepeatedDistributedSampler(ds, shuffle=False)
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            # a last training batch of one image fails BatchNorm ("expected more than 1 value per
            # channel"): a split of k * batch_size + 1 images drops that one image per epoch
            drop_last=split == "train" and len(ds) > self.batch_size and len(ds) % self.batch_size == 1,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
