"""``combined``: one estimator on the features of several other detectors at once."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from causal_ie.attacks.detectors.base import Detector

__all__ = ["CombinedDetector"]


class CombinedDetector(Detector):
    """The features of the detectors ``of`` (names in ``detection.detectors``; null: every other
    selected detector), concatenated and fitted by one ``estimator``. It computes nothing itself:
    the study hands it the features the others already computed."""

    def __init__(self, of: Sequence[str] | None = None, estimator: str = "logistic"):
        super().__init__(estimator)
        self.of = None if of is None else tuple(str(name) for name in of)
        if self.of is not None and not self.of:
            raise ValueError("combined.of names no detector (null: every other selected detector)")

    def combines(self, selected: Sequence[str]) -> tuple[str, ...]:
        """The detectors combined, among ``selected`` (the names of the detectors that compute
        features, in config order)."""
        if self.of is None:
            return tuple(selected)
        unknown = [n for n in self.of if n not in selected]
        if unknown:
            raise ValueError(f"combined.of names {unknown}, not among detection.detectors ({', '.join(selected)})")
        return self.of

    def features(self, classifier: nn.Module, images: Tensor, probs: Tensor, index: Tensor,
                 differentiable: bool = False) -> Mapping[str, Tensor]:
        raise RuntimeError("CombinedDetector has no features of its own: the study concatenates its parts'")
