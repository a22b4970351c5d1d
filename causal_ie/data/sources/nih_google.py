"""``data=nih_google``: NIH images with Google's radiologist-adjudicated labels of four findings."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from causal_ie.data.errors import DataError
from causal_ie.data.nih import check_root
from causal_ie.data.sources.files import Catalogue, FileSourceDataModule
from causal_ie.validators import subset


class NIHGoogleDataModule(FileSourceDataModule):
    """Google's labels (:mod:`causal_ie.data.nih_google`) over the NIH download's PNGs, decoded
    once into the image cache. Google's ``test`` set is the test split; train and val are drawn
    patient-wise from its ``val`` set. No localisation ground truth: NIH's boxes cover 61 of
    these images (15 with a matching Google label); localise on them with ``data=nih``.

    Args:
        root: the ChestX-ray14 folder (``images/`` or ``images_0NN/images/``).
        labels_file: the labels CSV (null: the copy torchxrayvision ships).
        views: the views kept (``PA``, ``AP``; ``"*"``: all).
        **settings: ``cache_dir``, ``val_fraction`` and the shared settings
            (:class:`~causal_ie.data.sources.files.FileSourceDataModule`).
    """

    source = "nih_google"

    def __init__(self, root: str | None = None, labels_file: str | None = None,
                 views: Sequence[str] = ("PA", "AP"), **settings: Any):
        super().__init__(root=root, **settings)
        from causal_ie.data import nih_google

        self.views = views = subset("data.views", views, nih_google.VIEWS)
        check_root(self.root)  # before the labels: a missing folder is named first
        self._labels_file = nih_google.labels_file(labels_file)
        nih_google.check_table(self._labels_file)
        self._reader = nih_google.xrv_dataset(Path(self.root), self._labels_file, views)
        self.labels = nih_google.label_space(self._reader)

    def catalogue(self) -> Catalogue:
        from causal_ie.data import nih_google

        csv = self._reader.csv
        ids = csv["Image Index"].astype(str).tolist()
        sets = csv["Set Id"].astype(str)
        unknown = sorted(set(sets) - set(nih_google.SETS))
        if unknown:
            raise DataError(f"{self._labels_file}: Set Id must be val or test, got {unknown}")
        return Catalogue(ids, csv["Patient ID"].astype(str).tolist(),
                         nih_google.image_paths(Path(self.root).expanduser(), ids),
                         np.asarray(self._reader.labels, dtype=np.float32), self._labels_file,
                         "test: Google's test set (official); train and val patient-wise by seed from its val set",
                         (sets == "test").to_numpy())

    def source_details(self) -> dict[str, Any]:
        return {"views": list(self.views)}
