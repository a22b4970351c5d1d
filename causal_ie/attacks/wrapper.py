"""Multi-label classifiers seen through softmax logits, so torchattacks can attack them.

torchattacks scores a model with softmax cross-entropy over class logits. A
multi-label classifier has one independent sigmoid per finding. For finding k,
the two logits [0, z_k] give softmax probabilities [1 - sigmoid(z_k),
sigmoid(z_k)], so softmax cross-entropy with label y is exactly the binary
cross-entropy of finding k with label y.

For the whole label vector (``finding=None``) the wrapper returns logits of
shape [N, 2, K]: torch's cross-entropy treats the trailing dimension like
pixels of a segmentation map, so ``CrossEntropyLoss()(logits, labels[N, K])``
is the BCE averaged over all findings, which is what the attacks that only use
``CrossEntropyLoss`` (FGSM, BIM, PGD, PGD-L2) need.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FindingLogits(nn.Module):
    """``model``'s logits [N, K] as two-class logits: [N, 2] for one finding, [N, 2, K] for all.

    softmax([0, z_k]) = (1 - y_k, y_k): the cross-entropy of label 0 is ``-log(1 - y_k)``
    and of label 1 is ``-log y_k``, so an untargeted softmax attack raises y_k with
    label 0 and lowers it with label 1.

    Args:
        model: maps images in [0, 1] to one logit per finding.
        finding: index of the finding for every image; a tensor with one index per
            image of the batch that will be passed (SVCE's APGD baseline); or None
            for every finding.
    """

    def __init__(self, model: nn.Module, finding: int | Tensor | None = None):
        super().__init__()
        self.model = model
        if isinstance(finding, Tensor):
            self.register_buffer("finding", finding.detach().clone().long().flatten())
        else:
            self.finding = finding
        # torchattacks switches the model to eval for the attack and back to the
        # *wrapper's* mode afterwards: a fresh module is in training mode, which would
        # leave an evaluated classifier training (BatchNorm on batch statistics)
        self.train(model.training)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.model(x)
        if logits.ndim != 2:
            raise ValueError(f"the classifier must return logits [N, K], got shape {tuple(logits.shape)}")
        if isinstance(self.finding, Tensor):
            if x.shape[0] != self.finding.shape[0]:
                raise ValueError(f"FindingLogits was set up for {self.finding.shape[0]} images, got {x.shape[0]}")
            logits = logits.gather(1, self.finding[:, None].to(logits.device)).squeeze(1)
        elif self.finding is not None:
            if not 0 <= self.finding < logits.shape[1]:
                raise ValueError(f"finding index {self.finding} is outside the model's {logits.shape[1]} findings")
            logits = logits[:, self.finding]
        return torch.stack([torch.zeros_like(logits), logits], dim=1)
