"""One LightningDataModule serving SyntheticCXR, ChestX-ray14 (NIH) and ChestMNIST."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset

from causal_ie.data.errors import DataError
from causal_ie.data.findings import NIH14
from causal_ie.data.relabel import RelabelledDataset
from causal_ie.labels import LabelAlignment, LabelSpace, align
from causal_ie.data.transforms import BoxAwareAugment, EmptyShard, IndexedDataset, TransformedDataset

log = logging.getLogger(__name__)

SOURCES = ("synthetic", "nih", "chestmnist")
SPLITS = ("train", "val", "test")


class ChestXray14DataModule(L.LightningDataModule):
    """Train/val/test splits of one data source, as batches of sample dicts.

    A batch holds ``image`` [B,1,S,S] in [0,1], ``labels`` [B,K] (1/0, NaN: unknown),
    ``boxes`` [B,K,4] (x, y, w, h in pixels of the batch image; NaN where a finding has
    no box), ``id`` and ``patient_id`` (lists of str). K labels of :attr:`labels`
    (NIH's 14 for every source here), or of a model's label space after
    :meth:`align_labels`.

    Args:
        source: ``synthetic`` (default; generated, no download), ``nih`` (the
            ChestX-ray14 folder at ``root``) or ``chestmnist`` (MedMNIST npz at ``root``).
        root: data folder for ``nih`` / ``chestmnist``.
        image_size: side of the square images fed to the model.
        augment: box-consistent random affine on the training split.
        synthetic: SyntheticCXR settings: ``num_train``, ``num_val``,
            ``num_test``, ``prevalence``, ``spurious`` (shortcut marker for
            train/val) and ``test_spurious`` (for test; default: as ``spurious``).
        test_boxes_only: NIH: test only on the images with radiologist boxes.
        test_subset: use only the first n test images (quick evaluations).
        chestmnist_size: which MedMNIST file to read (28/64/128/224); default:
            the smallest one at least ``image_size``.
        on_error: ``raise`` (default) or ``skip`` missing/unreadable files
            (counted in :meth:`data_report`).
    """

    def __init__(
        self,
        source: str = "synthetic",
        root: str | None = None,
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
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        cache_dir: str | None = None,
        test_boxes_only: bool = False,
        on_error: str = "raise",
        synthetic: dict[str, Any] | None = None,
        chestmnist_size: int | None = None,
        test_subset: int | None = None,
    ):
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"data.source={source!r}; expected one of {SOURCES}")
        if source != "synthetic" and root is None:
            raise DataError(f"data.root is required for data.source={source!r}: the folder holding the files")
        if source != "synthetic" and not Path(root).expanduser().exists():
            # before anything compares the data with a checkpoint (sizes, labels): the folder comes first
            raise DataError(f"data.root={str(root)!r} does not exist (data.source={source!r}: the folder holding the files)")
        if int(image_size) < 8:
            raise ValueError(f"data.image_size must be >= 8, got {image_size}")
        if int(batch_size) < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error must be 'raise' or 'skip', got {on_error!r}")
        self.source = source
        self.root = root
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = pin_memory
        self.seed = int(seed)
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.cache_dir = cache_dir
        self.test_boxes_only = test_boxes_only
        self.on_error = on_error
        self.synthetic = dict(synthetic or {})
        self.chestmnist_size = chestmnist_size
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
        self._nih: Any = None  # NIHSplits: the folder is read once for all three splits

    # -- building the splits -------------------------------------------------
    def _build(self, split: str) -> Dataset:
        if self.source == "synthetic":
            return self._synthetic(split)
        if self.source == "nih":
            return self._nih_splits().datasets[split]
        from causal_ie.data.chestmnist import ChestMNISTDataset, read_chestmnist

        # The smallest MedMNIST file at least as large as the wanted size.
        native = min((s for s in (28, 64, 128, 224) if s >= self.image_size), default=224)
        images, labels = read_chestmnist(self.root, size=self.chestmnist_size or native)[split]
        return ChestMNISTDataset(images, labels, image_size=self.image_size, split=split)

    def _nih_splits(self) -> Any:
        """All NIH splits, read once: prepare_data and every setup share them, so the
        problems of a partial download are logged once, not once per call."""
        if self._nih is None:
            from causal_ie.data.nih import load_splits

            self._nih = load_splits(
                self.root,
                self.image_size,
                cache_dir=self.cache_dir,
                val_fraction=self.val_fraction,
                test_fraction=self.test_fraction,
                seed=self.seed,
                on_error=self.on_error,
                boxes_only=("test",) if self.test_boxes_only else (),
            )
        return self._nih

    def _synthetic_sizes(self) -> dict[str, int]:
        cfg = self.synthetic
        return {"train": cfg.get("num_train", 4000), "val": cfg.get("num_val", 500), "test": cfg.get("num_test", 500)}

    def _synthetic(self, split: str) -> Dataset:
        from causal_ie.data.synthetic import SyntheticCXR

        cfg = self.synthetic
        sizes = self._synthetic_sizes()
        spurious = cfg.get("spurious")
        if split == "test" and "test_spurious" in cfg:
            spurious = cfg["test_spurious"]
        # Disjoint seeds: the three splits never share an image.
        return SyntheticCXR(
            num_samples=int(sizes[split]),
            image_size=self.image_size,
            seed=self.seed * 3 + SPLITS.index(split),
            prevalence=cfg.get("prevalence", 0.2),
            spurious=None if spurious is None else dict(spurious),
        )

    def prepare_data(self) -> None:
        # NIH: decode + resize once into the memmap cache (rank 0 only under DDP;
        # the other ranks read the finished cache in setup).
        if self.source == "nih":
            self._nih_splits()

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, SPLITS):
            if split not in self.datasets:
                self._dataset(split)
                log.info("%s split of %s: %d images", split, self.source, len(self.datasets[split]))
                if len(self.datasets[split]) == 0:
                    raise DataError(
                        f"the {split} split of data.source={self.source!r} is empty (data.root={self.root}){self._why_empty(split)}"
                    )

    def _why_empty(self, split: str) -> str:
        if self.source != "nih":
            return ""
        r = self.data_report()
        why = (
            f": {r['images_listed']} images listed in {r['metadata_file']}, {r['images_found']} found in "
            f"{', '.join(r['image_folders'])}, {r['images_used']} used ({r['split']})"
        )
        if split in r["boxes_only"]:
            why += "; data.test_boxes_only=true keeps only images with a box in BBox_List_2017.csv, set it false to test on all"
        return why + ". With a partial download, unpack more images_0NN tarballs"

    def data_report(self) -> dict[str, Any]:
        """What the splits hold and what was skipped, as plain JSON-ready data (results.json ``run.data``).

        Always ``source`` and ``splits`` ({split: {"images": n served, ...}},
        test after ``test_subset``, with ``images_before_subset`` where the
        subset cut it). NIH adds ``images_listed`` / ``images_found`` /
        ``images_readable`` / ``images_used`` / ``images_skipped``, ``skipped``
        ({reason: count}), ``skipped_examples`` ({reason: first file names}),
        ``image_folders``, ``metadata_file``, ``split``, ``boxes_only``,
        ``on_error`` and ``root``; per split also ``patients`` and
        ``with_boxes``. SyntheticCXR reports the generated images (nothing is
        generated to report them).
        """
        if self.source == "nih":
            report = copy.deepcopy(self._nih_splits().report)
        elif self.source == "synthetic":
            report = {"source": "synthetic", "splits": {s: {"images": int(n)} for s, n in self._synthetic_sizes().items()}}
        else:
            report = {"source": self.source, "root": str(self.root), "splits": {s: {"images": len(self._dataset(s))} for s in SPLITS}}
        test = report["splits"]["test"]
        if self.test_subset is not None and self.test_subset < test["images"]:
            test["images_before_subset"] = test["images"]
            test["images"] = self.test_subset
            if self.source == "nih":
                served = self._dataset("test")
                ids = [served.dataset.patient_ids[i] for i in served.indices]
                boxes = served.dataset.boxes[list(served.indices)]
                test["patients"] = len(set(ids))
                test["with_boxes"] = int((~np.isnan(boxes).all(axis=(1, 2))).sum())
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
                f"data.source={self.source!r} ({self.labels.name}: {', '.join(self.labels.names)}): nothing to score"
            )
        self.alignment = None if alignment.identity else alignment
        return alignment

    def dataset(self, split: str) -> Dataset:
        """The (unaugmented) data set of ``split``, built on first use, in the model's label
        space after :meth:`align_labels`."""
        ds = self._dataset(split)
        return ds if self.alignment is None else RelabelledDataset(ds, self.alignment)

    def _dataset(self, split: str) -> Dataset:
        """The data set of ``split`` in the data's own label space."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split not in self.datasets:
            ds = self._build(split)
            if split == "test" and self.test_subset is not None and self.test_subset < len(ds):
                ds = Subset(ds, range(self.test_subset))
            self.datasets[split] = ds
        return self.datasets[split]

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
        """BCE pos_weight per finding: negatives / positives on the training split."""
        labels = self.label_matrix("train")
        pos = labels.sum(0)
        neg = len(labels) - pos
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
            drop_last=False,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


