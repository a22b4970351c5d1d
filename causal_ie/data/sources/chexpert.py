"""``data=chexpert``: CheXpert's JPEGs and labels, uncertain labels by ``data.uncertain``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from causal_ie.data.errors import DataError
from causal_ie.data.sources.files import Catalogue, FileSourceDataModule
from causal_ie.validators import choice, subset

log = logging.getLogger(__name__)


class CheXpertDataModule(FileSourceDataModule):
    """CheXpert labelled by torchxrayvision's reader (:mod:`causal_ie.data.chexpert`), its JPEGs
    decoded once into the image cache. ``valid.csv`` is the test split when present (else the
    test split is drawn patient-wise from ``train.csv`` by ``test_fraction``); val is drawn
    patient-wise from ``train.csv``. No localisation ground truth: CheXpert scores
    classification (CheXlocalize's segmentations are a separate release).

    Args:
        root: ``CheXpert-v1.0-small/`` or the folder holding it.
        uncertain: ``ignore`` (an uncertain label is left out of the loss and the AUROCs),
            ``ones`` or ``zeros``.
        views: the views kept (``PA``, ``AP``, ``L`` for lateral; ``"*"``: all).
        **settings: ``cache_dir``, ``val_fraction``, ``test_fraction`` and the shared settings
            (:class:`~causal_ie.data.sources.files.FileSourceDataModule`).
    """

    source = "chexpert"

    def __init__(self, root: str | None = None, uncertain: str = "ignore", views: Sequence[str] = ("PA", "AP"),
                 **settings: Any):
        super().__init__(root=root, **settings)
        from causal_ie.data import chexpert

        self.uncertain = choice("data.uncertain", uncertain, chexpert.UNCERTAIN)
        self.views = views = subset("data.views", views, chexpert.VIEWS)
        self._release = chexpert.folder(self.root)
        tables = [self._release / chexpert.TRAIN] + ([self._release / chexpert.TEST]
                                                     if (self._release / chexpert.TEST).is_file() else [])
        for table in tables:
            chexpert.check_table(table)
        self._readers = [chexpert.xrv_dataset(self._release, t, views) for t in tables]
        if self._readers[0] is None:
            raise DataError(f"no image of data.views={views} in {tables[0]}")
        if len(self._readers) > 1 and self._readers[1] is None:
            log.warning("CheXpert: no image of data.views=%s in %s; the test split is drawn from %s instead",
                        views, tables[1], tables[0].name)
            self._readers.pop()
        self.labels = chexpert.label_space(self._readers[0])
        self._uncertain_count = 0

    def catalogue(self) -> Catalogue:
        from causal_ie.data import chexpert

        ids, patients, paths, labels, official = [], [], [], [], []
        self._uncertain_count = 0
        for n, reader in enumerate(self._readers):
            listed = reader.csv["Path"].astype(str).tolist()
            values, unsure = chexpert.labels(reader, self.uncertain)
            ids += listed
            patients += chexpert.patient_ids(reader)
            paths += [chexpert.image_path(self._release, p) for p in listed]
            labels.append(values)
            official += [n == 1] * len(listed)
            self._uncertain_count += unsure
        has_test = len(self._readers) > 1
        split = ("test: valid.csv (official); train and val patient-wise by seed from train.csv" if has_test
                 else "patient-wise by seed (no valid.csv)")
        return Catalogue(ids, patients, paths, np.concatenate(labels), self._release / chexpert.TRAIN, split,
                         np.asarray(official) if has_test else None)

    def source_details(self) -> dict[str, Any]:
        return {"uncertain": self.uncertain, "uncertain_labels": self._uncertain_count, "views": list(self.views)}
