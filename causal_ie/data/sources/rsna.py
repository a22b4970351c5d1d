"""``data=rsna``: RSNA Pneumonia Detection's DICOMs and its opacity boxes, as per-label masks."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from causal_ie.data.errors import ProblemLog
from causal_ie.data.ground_truth import ReaderBoxes
from causal_ie.data.sources.files import Catalogue, FileSourceDataModule
from causal_ie.validators import subset

log = logging.getLogger(__name__)


class RSNADataModule(FileSourceDataModule):
    """RSNA Pneumonia labelled by torchxrayvision's reader, its DICOMs decoded once into the image
    cache, its boxes drawn as masks of both labels (:mod:`causal_ie.data.rsna`). The challenge
    published no patient ids: the splits are image-wise by seed.

    Args:
        root: the folder holding ``stage_2_train_labels.csv`` and ``stage_2_train_images/``.
        views: the views kept (``PA``, ``AP``; ``"*"``: all), from torchxrayvision's headers table.
        **settings: ``cache_dir``, ``val_fraction``, ``test_fraction`` and the shared settings
            (:class:`~causal_ie.data.sources.files.FileSourceDataModule`).
    """

    source = "rsna"

    def __init__(self, root: str | None = None, views: Sequence[str] = ("PA", "AP"), **settings: Any):
        super().__init__(root=root, **settings)
        from causal_ie.data import rsna

        self.views = views = subset("data.views", views, rsna.VIEWS)
        self._label_file = rsna.label_file(self.root)
        self._rows = rsna.read_labels(self._label_file)
        self._reader = rsna.xrv_dataset(self._label_file, views)
        self.labels = rsna.label_space(self._reader)

    def catalogue(self) -> Catalogue:
        from causal_ie.data import rsna

        ids = self._reader.csv["patientId"].astype(str).tolist()
        folder = rsna.image_folder(self._label_file)
        return Catalogue(ids, ids, [folder / f"{i}{rsna.SUFFIX}" for i in ids],
                         np.asarray(self._reader.labels, dtype=np.float32), self._label_file,
                         "image-wise by seed (no patient ids)")

    def ground_truth(self, ids: list[str], sizes: np.ndarray, problems: ProblemLog) -> ReaderBoxes:
        from causal_ie.data import rsna

        boxes = rsna.box_rows(self._rows, self.labels, {n: k for k, n in enumerate(ids)}, sizes, problems)
        return ReaderBoxes(boxes, sizes, len(self.labels))

    def source_details(self) -> dict[str, Any]:
        # torchxrayvision's headers table covers the stage-2 training set; an image it lacks has
        # no known view and is kept only by views='*'
        listed = set(self._rows["patientId"])
        unknown = len(listed - set(self._reader.dicomcsv.index.astype(str)))
        kept = len(self._reader.csv)
        if unknown and "*" not in self.views:
            log.warning("RSNA: %d listed images are not in torchxrayvision's DICOM headers table (their view is "
                        "unknown) and are left out; data.views='*' keeps them", unknown)
        return {"views": list(self.views), "images_view_unknown": unknown,
                "images_other_views": len(listed) - kept - (0 if "*" in self.views else unknown)}
