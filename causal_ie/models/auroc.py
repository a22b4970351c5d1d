"""Per-label AUROC for any number of labels: torchmetrics' MultilabelAUROC needs at least two,
and a data set may annotate one (SIIM-ACR: Pneumothorax). Unknown labels (NaN: an uncertain
CheXpert label left out, a finding the data set does not annotate) are left out of each
label's AUROC, not counted as negatives (:func:`auroc_targets`)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import BinaryAUROC, MultilabelAUROC


IGNORED = -1  # the target value the AUROCs leave out


def auroc_targets(labels: Tensor) -> Tensor:
    """Integer AUROC targets of 0/1 labels, NaN (unknown) as :data:`IGNORED`."""
    return torch.where(torch.isnan(labels), torch.full_like(labels, IGNORED), labels).long()


class SingleLabelAUROC(BinaryAUROC):
    """MultilabelAUROC's ``update`` for one label ([B, 1] scores and targets)."""

    def update(self, preds: Tensor, target: Tensor) -> None:  # type: ignore[override]
        super().update(preds.reshape(-1), target.reshape(-1))


def label_auroc(num_labels: int) -> Metric:
    """One AUROC per label (``average=None``). torchmetrics squeezes a one-element result to a
    scalar: read it through :func:`per_label`."""
    if num_labels < 1:
        raise ValueError(f"an AUROC needs at least one label, got {num_labels}")
    if num_labels == 1:
        return SingleLabelAUROC(ignore_index=IGNORED)
    return MultilabelAUROC(num_labels=num_labels, average=None, ignore_index=IGNORED)


def per_label(values: Tensor) -> Tensor:
    """A per-label AUROC result as [K], also for K = 1 (which ``compute`` returns as a scalar)."""
    return values.reshape(-1)
