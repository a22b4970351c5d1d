"""Per-label AUROC for any number of labels: torchmetrics' MultilabelAUROC needs at least two,
and a data set may annotate one (SIIM-ACR: Pneumothorax). Unknown labels (NaN: an uncertain
CheXpert label left out, a finding the data set does not annotate) are left out of each
label's AUROC, not counted as negatives (:func:`auroc_targets`)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import BinaryAUROC, MultilabelAUROC
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.utilities import dim_zero_cat


IGNORED = -1  # the target value the AUROCs leave out


def auroc_targets(labels: Tensor) -> Tensor:
    """Integer AUROC targets of 0/1 labels, NaN (unknown) as :data:`IGNORED`."""
    return torch.where(torch.isnan(labels), torch.full_like(labels, IGNORED), labels).long()


def _known_aurocs(preds: Tensor, target: Tensor) -> Tensor:
    """[K] AUROC of each column over its known rows; NaN where it is undefined: a column with no
    known row (torchmetrics fails on it: a model output the data does not annotate) or with one
    class only (torchmetrics returns 0 there, which a mean over findings would count)."""
    out = []
    for k in range(target.shape[1]):
        known = target[:, k][target[:, k] != IGNORED]
        if bool((known == 1).any()) and bool((known == 0).any()):
            keep = target[:, k] != IGNORED
            out.append(binary_auroc(preds[keep, k], target[keep, k]))
        else:
            out.append(torch.tensor(float("nan"), device=preds.device))
    return torch.stack(out)


class KnownLabelAUROC(MultilabelAUROC):
    """MultilabelAUROC per label over the known targets only (``ignore_index`` = :data:`IGNORED`)."""

    def __init__(self, num_labels: int):
        super().__init__(num_labels=num_labels, average=None, ignore_index=IGNORED)

    def compute(self) -> Tensor:
        return _known_aurocs(dim_zero_cat(self.preds), dim_zero_cat(self.target))


class SingleLabelAUROC(BinaryAUROC):
    """MultilabelAUROC's ``update`` for one label ([B, 1] scores and targets), unknown targets out."""

    def __init__(self) -> None:
        super().__init__(ignore_index=IGNORED)

    def update(self, preds: Tensor, target: Tensor) -> None:  # type: ignore[override]
        super().update(preds.reshape(-1), target.reshape(-1))

    def compute(self) -> Tensor:
        return _known_aurocs(dim_zero_cat(self.preds)[:, None], dim_zero_cat(self.target)[:, None])[0]


def label_auroc(num_labels: int) -> Metric:
    """One AUROC per label (``average=None``). torchmetrics squeezes a one-element result to a
    scalar: read it through :func:`per_label`."""
    if num_labels < 1:
        raise ValueError(f"an AUROC needs at least one label, got {num_labels}")
    return SingleLabelAUROC() if num_labels == 1 else KnownLabelAUROC(num_labels)


def per_label(values: Tensor) -> Tensor:
    """A per-label AUROC result as [K], also for K = 1 (which ``compute`` returns as a scalar)."""
    return values.reshape(-1)
