"""One logit for an attacker who knows several detectors: flagged by any of them or by none.

Each attacked detector ``d`` has a fitted logistic estimator on its features and a threshold
``tau_d`` (its 5 %-FPR operating point on clean training images). Its *margin logit*
``m_d(x) = logit_d(x) - tau_d`` is positive where ``d`` flags ``x``; the log-odds units of the
logistic estimators make the margins comparable across detectors. The joint logit is

    J(x) = max_d m_d(x)       (forward value: J < 0 iff no detector flags x),

and its gradient is that of the sum of the margins of the detectors that flag ``x`` now
(within ``margin``), or of the largest margin when none does: the attacker pushes down every
detector that still sees it at once, the selective step of Bryniarski et al. 2022 taken over
detectors (BPDA: :func:`causal_ie.attacks.adaptive.bpda`). With one detector, ``J = m_d`` and
its gradient is that detector's own. Randomised detectors are averaged over ``eot_samples``
draws per call (expectation over transformation, Athalye et al. 2018).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from causal_ie.attacks.adaptive import bpda, logistic_logit
from causal_ie.attacks.detection_study import DetectorRow
from causal_ie.attacks.detectors import Detector

__all__ = ["JointDetectorLogit"]


class JointDetectorLogit:
    """images [B, C, H, W] -> the joint margin logit [B] of the ``attacked`` rows (see the module).

    Args:
        classifier: the attacked classifier.
        detectors: name -> detector (those that compute features).
        rows: the scored rows (:meth:`~causal_ie.attacks.detection_study.DetectionStudy.rows`).
        fitted: row -> its fitted logistic estimator.
        thresholds: row -> its threshold (the estimator's decision function at 5 % FPR).
        attacked: the rows the attacker differentiates through.
        eot_samples: draws averaged per call for randomised detectors.
        margin: a detector within this many log-odds of flagging counts as flagging.
    """

    def __init__(
        self, classifier: nn.Module, detectors: Mapping[str, Detector], rows: Mapping[str, DetectorRow],
        fitted: Mapping[str, Any], thresholds: Mapping[str, float], attacked: Sequence[str], eot_samples: int = 1,
        margin: float = 0.0,
    ):
        if not attacked:
            raise ValueError("the joint attacker needs at least one detector to attack")
        self.classifier, self.detectors = classifier, detectors
        self.rows = {name: rows[name] for name in attacked}
        self.logits = {name: logistic_logit(fitted[name]) for name in attacked}
        self.thresholds = {name: float(thresholds[name]) for name in attacked}
        self.eot_samples, self.margin = int(eot_samples), float(margin)
        # the detectors whose features the attacked rows read, each computed once per call
        self.sources = sorted({d for row in self.rows.values() for d, _ in row.features})

    def features(self, x: Tensor) -> dict[str, Mapping[str, Tensor]]:
        """Differentiable features of ``x`` of every source detector (EOT means for randomised ones)."""
        out: dict[str, Mapping[str, Tensor]] = {}
        for name in self.sources:
            detector = self.detectors[name]
            draws = self.eot_samples if getattr(detector, "randomised", False) else 1
            total: dict[str, Tensor] = {}
            for _ in range(draws):
                for key, value in detector.features(self.classifier, x, None, None, differentiable=True).items():
                    total[key] = total[key] + value if key in total else value
            out[name] = {key: value / draws for key, value in total.items()}
        return out

    def margins(self, x: Tensor) -> Tensor:
        """``m_d(x)`` [B, D] of the attacked rows, in their order."""
        features = self.features(x)
        columns = []
        for name, row in self.rows.items():
            matrix = torch.stack([features[d][f].to(x.dtype) for d, f in row.features], dim=1)
            columns.append(self.logits[name](matrix) - self.thresholds[name])
        return torch.stack(columns, dim=1)

    def __call__(self, x: Tensor) -> Tensor:
        margins = self.margins(x)
        value = margins.amax(dim=1)
        flagging = margins.detach() > -self.margin
        surrogate = torch.where(flagging.any(dim=1), (margins * flagging.to(margins.dtype)).sum(dim=1), value)
        return bpda(value, surrogate)
