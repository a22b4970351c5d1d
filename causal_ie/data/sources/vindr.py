"""``data=vindr``: VinDr-CXR's DICOMs and its three readers' boxes, as per-label masks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from causal_ie.data.errors import ProblemLog
from causal_ie.data.ground_truth import READER_RULES, ReaderBoxes
from causal_ie.data.sources.files import Catalogue, FileSourceDataModule
from causal_ie.validators import choice


class VinDrDataModule(FileSourceDataModule):
    """VinDr-CXR labelled by torchxrayvision's reader, its DICOMs decoded once into the image
    cache, its readers' boxes drawn as masks (:mod:`causal_ie.data.vindr`). The Kaggle set has
    no official split and no patient ids: the splits are image-wise by seed.

    Args:
        root: the folder holding ``train.csv`` and ``train/<image_id>.dicom``.
        readers: how the 3 readers' boxes combine into a mask: ``any`` (union) or ``majority``.
        **settings: ``cache_dir``, ``val_fraction``, ``test_fraction`` and the shared settings
            (:class:`~causal_ie.data.sources.files.FileSourceDataModule`).
    """

    source = "vindr"

    def __init__(self, root: str | None = None, readers: str = "any", **settings: Any):
        super().__init__(root=root, **settings)
        self.readers = choice("data.readers", readers, READER_RULES)
        from causal_ie.data import vindr

        self._annotation_file = vindr.annotation_file(self.root)
        self._annotations = vindr.read_annotations(self._annotation_file)
        self._reader = vindr.xrv_dataset(self.root, self._annotation_file)
        self.labels = vindr.label_space(self._reader)

    def catalogue(self) -> Catalogue:
        from causal_ie.data import vindr

        ids = self._reader.csv["image_id"].astype(str).tolist()
        folder = Path(self.root).expanduser() / vindr.IMAGE_FOLDER
        return Catalogue(ids, ids, [folder / f"{i}{vindr.SUFFIX}" for i in ids],
                         np.asarray(self._reader.labels, dtype=np.float32), self._annotation_file,
                         "image-wise by seed (no patient ids)")

    def ground_truth(self, ids: list[str], sizes: np.ndarray, problems: ProblemLog) -> ReaderBoxes:
        from causal_ie.data import vindr

        boxes = vindr.box_rows(self._annotations, self.labels, {n: k for k, n in enumerate(ids)}, sizes, problems)
        return ReaderBoxes(boxes, sizes, len(self.labels), self.readers)

    def source_details(self) -> dict[str, Any]:
        return {"readers": self.readers}
