"""Findings a classifier does not predict.

A pretrained network may lack some of the 14 findings (a CheXpert model has no
Mass or Hernia); its logits there are NaN (see
:class:`~causal_ie.models.xrv.XRVClassifier`), and results report those findings
as missing instead of scoring them: box pairs skip them, AUROCs are NaN there,
means and maxima over findings ignore them (``nanmean``, NaN never wins an argmax).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def predicted_mask(classifier: nn.Module) -> Tensor:
    """bool [K]: True for the findings ``classifier`` predicts (not in its ``missing_findings``)."""
    missing = set(getattr(classifier, "missing_findings", ()))
    return torch.tensor([name not in missing for name in classifier.findings], dtype=torch.bool)


def finding_aurocs(per_finding: Tensor, predicted: Tensor) -> tuple[float, list[float]]:
    """(mean over the predicted findings, per finding with NaN for the missing ones) of
    per-finding AUROCs that were computed with the missing findings' scores filled in."""
    # reshape: a one-label AUROC comes back from torchmetrics as a scalar
    values = per_finding.detach().cpu().reshape(-1).masked_fill(~predicted.cpu(), float("nan"))
    mean = float(values.nanmean()) if bool(predicted.any()) else float("nan")
    return mean, values.tolist()
