"""Data: the 14 findings, the readers (NIH, ChestMNIST, VinDr-CXR), SyntheticCXR and the data sources.

Submodules (``nih``, ``chestmnist``, ``synthetic``, ``cache``, ``sources``) are imported
on use so ``from causal_ie.data import FINDINGS`` stays light. A data source is a datamodule
per data set (:mod:`causal_ie.data.sources`), each the ``_target_`` of a ``conf/data/`` file.
"""

from causal_ie.data.errors import DataError
from causal_ie.data.findings import FINDINGS, NIH14, NUM_FINDINGS, finding_index

__all__ = ["FINDINGS", "NIH14", "NUM_FINDINGS", "DataError", "finding_index", "CXRDataModule"]


def __getattr__(name: str):
    if name == "CXRDataModule":
        from causal_ie.data.datamodule import CXRDataModule

        return CXRDataModule
    raise AttributeError(f"module 'causal_ie.data' has no attribute {name!r}")
