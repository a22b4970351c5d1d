"""``data=synthetic``: SyntheticCXR, procedural radiographs with each finding inside a known box."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from causal_ie.data.datamodule import SPLITS, CXRDataModule


class SyntheticDataModule(CXRDataModule):
    """SyntheticCXR's three splits, generated from disjoint seeds (no download).

    Args:
        synthetic: ``num_train``, ``num_val``, ``num_test``, ``prevalence``, ``spurious``
            (shortcut marker for train/val) and ``test_spurious`` (for test; default: as
            ``spurious``).
        **settings: the shared datamodule settings (:class:`CXRDataModule`).
    """

    source = "synthetic"

    def __init__(self, synthetic: dict[str, Any] | None = None, **settings: Any):
        super().__init__(**settings)
        self.synthetic = dict(synthetic or {})

    def sizes(self) -> dict[str, int]:
        cfg = self.synthetic
        return {"train": cfg.get("num_train", 4000), "val": cfg.get("num_val", 500), "test": cfg.get("num_test", 500)}

    def build_split(self, split: str) -> Dataset:
        from causal_ie.data.synthetic import SyntheticCXR

        cfg = self.synthetic
        spurious = cfg.get("spurious")
        if split == "test" and "test_spurious" in cfg:
            spurious = cfg["test_spurious"]
        # Disjoint seeds: the three splits never share an image.
        return SyntheticCXR(
            num_samples=int(self.sizes()[split]),
            image_size=self.image_size,
            seed=self.seed * 3 + SPLITS.index(split),
            prevalence=cfg.get("prevalence", 0.2),
            spurious=None if spurious is None else dict(spurious),
        )

    def source_report(self) -> dict[str, Any]:
        # the generated images are counted without generating them
        return {"source": self.source, "splits": {s: {"images": int(n)} for s, n in self.sizes().items()}}
