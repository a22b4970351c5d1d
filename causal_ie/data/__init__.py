"""Data: the 14 findings, the NIH / ChestMNIST readers, SyntheticCXR and the datamodule.

Submodules (``nih``, ``chestmnist``, ``synthetic``, ``cache``) are imported
on use so ``from causal_ie.data import FINDINGS`` stays light.
"""

from causal_ie.data.errors import DataError
from causal_ie.data.findings import FINDINGS, NIH14, NUM_FINDINGS, finding_index

__all__ = ["FINDINGS", "NIH14", "NUM_FINDINGS", "DataError", "finding_index", "ChestXray14DataModule"]


def __getattr__(name: str):
    if name == "ChestXray14DataModule":
        from causal_ie.data.datamodule import ChestXray14DataModule

        return ChestXray14DataModule
    raise AttributeError(f"module 'causal_ie.data' has no attribute {name!r}")
