"""``data=siim``: SIIM-ACR Pneumothorax's DICOMs and run-length encoded segmentations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from causal_ie.data.errors import ProblemLog
from causal_ie.data.sources.files import Catalogue, FileSourceDataModule
from causal_ie.labels import LabelSpace


class SIIMDataModule(FileSourceDataModule):
    """SIIM-ACR Pneumothorax: one label, its segmentation as the mask (:mod:`causal_ie.data.siim`).

    Args:
        root: the folder holding ``train-rle.csv`` and ``dicom-images-train/``.
        **settings: ``cache_dir``, ``val_fraction``, ``test_fraction`` and the shared settings
            (:class:`~causal_ie.data.sources.files.FileSourceDataModule`).
    """

    source = "siim"

    def __init__(self, root: str | None = None, **settings: Any):
        super().__init__(root=root, **settings)
        from causal_ie.data import siim

        self._rle_file = siim.rle_file(self.root)
        self._rows = siim.read_rle(self._rle_file)
        self.labels = LabelSpace((siim.LABEL,), "siim")
        self._encodings = self._rows.groupby("ImageId", sort=False)["EncodedPixels"].agg(list)

    def catalogue(self) -> Catalogue:
        from causal_ie.data import siim

        ids = [str(i) for i in self._encodings.index]
        found = siim.find_dicoms(self.root)
        folder = Path(self.root).expanduser() / siim.IMAGE_FOLDER
        paths = [found.get(i, folder / f"{i}.dcm") for i in ids]  # a missing one is reported by its name
        present = np.array([[any(e != "-1" for e in self._encodings[i])] for i in ids], dtype=np.float32)
        return Catalogue(ids, ids, paths, present.reshape(len(ids), 1), self._rle_file,
                         "image-wise by seed (the run-length file names no patients)")

    def ground_truth(self, ids: list[str], sizes: np.ndarray, problems: ProblemLog) -> Any:
        from causal_ie.data.siim import RunLengthMasks

        return RunLengthMasks([list(self._encodings[i]) for i in ids], sizes, 0,
                              len(self.labels))
