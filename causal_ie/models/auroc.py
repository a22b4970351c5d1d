"""Per-label AUROC for any number of labels: torchmetrics' MultilabelAUROC needs at least two,
and a data set may annotate one (SIIM-ACR: Pneumothorax)."""

from __future__ import annotations

from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import BinaryAUROC, MultilabelAUROC


class SingleLabelAUROC(BinaryAUROC):
    """MultilabelAUROC's ``update`` for one label ([B, 1] scores and targets)."""

    def update(self, preds: Tensor, target: Tensor) -> None:  # type: ignore[override]
        super().update(preds.reshape(-1), target.reshape(-1))


def label_auroc(num_labels: int) -> Metric:
    """One AUROC per label (``average=None``). torchmetrics squeezes a one-element result to a
    scalar: read it through :func:`per_label`."""
    if num_labels < 1:
        raise ValueError(f"an AUROC needs at least one label, got {num_labels}")
    return SingleLabelAUROC() if num_labels == 1 else MultilabelAUROC(num_labels=num_labels, average=None)


def per_label(values: Tensor) -> Tensor:
    """A per-label AUROC result as [K], also for K = 1 (which ``compute`` returns as a scalar)."""
    return values.reshape(-1)
