"""Data sources: one datamodule per data set, each the ``_target_`` of a ``conf/data/`` file.

``synthetic`` (SyntheticCXR, generated, no download), ``nih`` (ChestX-ray14 as the NIH
download unpacks), ``chestmnist`` (MedMNIST's npz files) and ``vindr`` (VinDr-CXR's DICOMs
through torchxrayvision's reader, ground truth as per-label masks). Each module is imported on
use, so a source's readers (pydicom, torchxrayvision) load only when it is chosen.
"""

from __future__ import annotations

__all__ = ["SyntheticDataModule", "NIHDataModule", "ChestMNISTDataModule", "VinDrDataModule"]

_MODULES = {
    "SyntheticDataModule": "synthetic",
    "NIHDataModule": "nih",
    "ChestMNISTDataModule": "chestmnist",
    "VinDrDataModule": "vindr",
}


def __getattr__(name: str):
    if name in _MODULES:
        import importlib

        return getattr(importlib.import_module(f"causal_ie.data.sources.{_MODULES[name]}"), name)
    raise AttributeError(f"module 'causal_ie.data.sources' has no attribute {name!r}")
