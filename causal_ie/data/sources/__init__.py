"""Data sources: one datamodule per data set, each the ``_target_`` of a ``conf/data/`` file.

``synthetic`` (SyntheticCXR, generated, no download), ``nih`` (ChestX-ray14 as the NIH
download unpacks), ``chestmnist`` (MedMNIST's npz files), ``vindr`` (VinDr-CXR's DICOMs and its readers'
boxes), ``rsna`` (RSNA Pneumonia's DICOMs and opacity boxes), ``chexpert`` (CheXpert's JPEGs and labels, no ground truth), ``nih_google`` (NIH PNGs
with Google's adjudicated labels) and ``siim`` (SIIM-ACR's DICOMs and run-length segmentations); the DICOM sets share
:mod:`causal_ie.data.sources.files` and serve their ground truth as per-label masks. Each module is imported on
use, so a source's readers (pydicom, torchxrayvision) load only when it is chosen.
"""

from __future__ import annotations

__all__ = ["SyntheticDataModule", "NIHDataModule", "ChestMNISTDataModule", "VinDrDataModule", "RSNADataModule", "SIIMDataModule",
           "CheXpertDataModule", "NIHGoogleDataModule"]

_MODULES = {
    "SyntheticDataModule": "synthetic",
    "NIHDataModule": "nih",
    "ChestMNISTDataModule": "chestmnist",
    "VinDrDataModule": "vindr",
    "RSNADataModule": "rsna",
    "SIIMDataModule": "siim",
    "CheXpertDataModule": "chexpert",
    "NIHGoogleDataModule": "nih_google",
}


def __getattr__(name: str):
    if name in _MODULES:
        import importlib

        return getattr(importlib.import_module(f"causal_ie.data.sources.{_MODULES[name]}"), name)
    raise AttributeError(f"module 'causal_ie.data.sources' has no attribute {name!r}")
