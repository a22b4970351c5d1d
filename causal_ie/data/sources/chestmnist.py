"""``data=chestmnist``: MedMNIST's ChestMNIST, ``chestmnist_{28,64,128,224}.npz`` in ``data.root``."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from causal_ie.data.datamodule import CXRDataModule, data_root


class ChestMNISTDataModule(CXRDataModule):
    """ChestMNIST's official splits (NIH's 14 findings, no boxes, no patient ids).

    Args:
        root: the folder holding the npz files.
        chestmnist_size: which file to read (28/64/128/224); default: the smallest one at
            least ``image_size``.
        **settings: the shared datamodule settings (:class:`CXRDataModule`).
    """

    source = "chestmnist"

    def __init__(self, root: str | None = None, chestmnist_size: int | None = None, **settings: Any):
        super().__init__(**settings)
        self.root = data_root(root, self.source)
        self.chestmnist_size = chestmnist_size

    def build_split(self, split: str) -> Dataset:
        from causal_ie.data.chestmnist import ChestMNISTDataset, read_chestmnist

        native = min((s for s in (28, 64, 128, 224) if s >= self.image_size), default=224)
        images, labels = read_chestmnist(self.root, size=self.chestmnist_size or native)[split]
        return ChestMNISTDataset(images, labels, image_size=self.image_size, split=split)

    def source_report(self) -> dict[str, Any]:
        return {**super().source_report(), "root": str(self.root)}
