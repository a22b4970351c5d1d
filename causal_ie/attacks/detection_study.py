"""Detection: every selected detector, cross-fitted on the attack pairs and scored with intervals.

The detectors come from ``detection.detectors`` (a mapping from name to a
:class:`~causal_ie.attacks.detectors.Detector`). Per batch :meth:`DetectionStudy.features`
records each detector's features of the clean and the adversarial images; after the test
loop :meth:`DetectionStudy.score` cross-fits every detector (patient-grouped halves, each
pair scored by a detector that never saw its patient), and gives AUROC and TPR at 5 % FPR
with patient-bootstrap intervals, and the AUROC differences of the detectors that read CE
against those that do not.

The scored *rows* are the detectors that compute features, their views (the CE detector's
pixel and latent halves: ``ce_pixel``, ``ce_latent``) and the combinations
(:class:`~causal_ie.attacks.detectors.CombinedDetector`) of other detectors' features.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from math import nan
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve
from torch import Tensor, nn

from causal_ie import validators
from causal_ie.attacks.detection import DetectionData, auroc_difference, crossfit_scores, score_detector
from causal_ie.attacks.detectors import CombinedDetector, Detector
from causal_ie.attacks.records import PAIRS, AttackRecords, Column

log = logging.getLogger(__name__)

__all__ = ["DetectionStudy", "DetectorRow"]

UNSCORED = ("auroc", "auroc_ci_low", "auroc_ci_high", "tpr@5fpr", "tpr@5fpr_ci_low", "tpr@5fpr_ci_high")


@dataclass(frozen=True)
class DetectorRow:
    """One scored detector: the features it reads (``(detector, feature)`` pairs of the
    records), the detector whose estimator is fitted on them, and whether it reads CE."""

    name: str
    detector: Detector
    features: tuple[tuple[str, str], ...]
    reads_ce: bool

    def matrices(self, records: AttackRecords) -> tuple[np.ndarray, np.ndarray]:
        """(clean [N, F], adversarial [N, F]) of every record."""
        return tuple(  # type: ignore[return-value]
            np.stack([records.columns[("feature", d, f, side)] for d, f in self.features], axis=1)
            for side in ("clean", "adv")
        )

    def fit(self, clean: np.ndarray, adv: np.ndarray, train: np.ndarray, seed: int) -> Any:
        return self.detector.fit(clean, adv, train, seed)


class DetectionStudy:
    """The detectors of the attack study and how they are scored.

    Args:
        detectors: name -> detector (``detection.detectors``), in report order.
        pairs: which (clean, adversarial) pairs are fitted and scored: ``successful`` (the
            attack reached its goal: what the literature scores; the changed pairs are scored
            as well), ``changed`` (the attack changed the image; APGD, Square and CW return the
            clean image where they fail) or ``all``.
        repeats: each detector's out-of-sample scores are the mean over this many patient
            2-fold cross-fits.
        n_boot: patient-bootstrap resamples of every interval.
        seed: the first split's seed (and the bootstrap's).
    """

    def __init__(
        self, detectors: Mapping[str, Detector], pairs: str = "successful", repeats: int = 2, n_boot: int = 2000,
        seed: int = 0,
    ):
        if not detectors:
            raise ValueError("detection.detectors is empty: select at least one detector (conf/detector/)")
        for name, detector in detectors.items():
            if not isinstance(detector, Detector):
                raise TypeError(
                    f"detection.detectors.{name} is a {type(detector).__name__}: expected a detector, an instance of a "
                    "subclass of causal_ie.attacks.detectors.Detector (with features(classifier, images, probs, index))"
                )
        self.detectors = dict(detectors)
        self.pairs = validators.choice("detection.pairs", pairs, PAIRS)
        self.repeats = validators.count("detection.repeats", repeats)
        self.n_boot = validators.count("detection.n_boot", n_boot, 100)
        self.seed = int(seed)
        self.computing = [n for n, d in self.detectors.items() if not isinstance(d, CombinedDetector)]
        for name, detector in self.detectors.items():
            if isinstance(detector, CombinedDetector):
                detector.combines(self.computing)  # an unknown part fails before any work

    # -- before and during the test loop -----------------------------------------------
    def fit_reference(self, classifier: nn.Module, images: Sequence[Tensor]) -> int:
        """Fit the detectors that need clean reference images; returns how many they got."""
        needing = [d for n, d in self.detectors.items() if getattr(d, "needs_reference", False)]
        for detector in needing:
            detector.fit_reference(classifier, images)
        return sum(len(x) for x in images) if needing else 0

    @property
    def needs_reference(self) -> bool:
        return any(getattr(d, "needs_reference", False) for d in self.detectors.values())

    def features(self, classifier: nn.Module, images: Tensor, probs: Tensor, index: Tensor, side: str) -> dict[Column, Tensor]:
        """Record columns ``("feature", detector, feature, side)`` of every detector that computes features."""
        columns: dict[Column, Tensor] = {}
        for name in self.computing:
            values = self.detectors[name].features(classifier, images, probs, index)
            if not values:
                raise RuntimeError(f"detection.detectors.{name}: features() returned no features")
            for feature, value in values.items():
                value = value.detach().reshape(-1)
                if len(value) != len(images):
                    raise RuntimeError(
                        f"detection.detectors.{name}: feature {feature!r} has {len(value)} values for {len(images)} images"
                    )
                columns[("feature", name, str(feature), side)] = value.to(images.device)
        return columns

    # -- after the test loop ----------------------------------------------------------
    def rows(self, records: AttackRecords) -> dict[str, DetectorRow]:
        """Every scored detector row (see the module docstring), in report order."""
        rows: dict[str, DetectorRow] = {}
        for name in self.computing:
            detector = self.detectors[name]
            names = records.feature_names(name)
            reads = bool(detector.reads_ce)
            rows[name] = DetectorRow(name, detector, tuple((name, f) for f in names), reads)
            for view, subset in detector.views(names).items():
                rows[f"{name}_{view}"] = DetectorRow(f"{name}_{view}", detector, tuple((name, f) for f in subset), reads)
        # the combinations last: they are fitted on what the others computed
        for name, detector in self.detectors.items():
            if isinstance(detector, CombinedDetector):
                parts = detector.combines(self.computing)
                features = tuple(f for part in parts for f in rows[part].features)
                rows[name] = DetectorRow(name, detector, features, any(rows[part].reads_ce for part in parts))
        return rows

    def crossfit(self, rows: Mapping[str, DetectorRow], records: AttackRecords, selection: np.ndarray):
        """Out-of-sample scores (clean [n], adversarial [n]) of each row on the selected pairs,
        and the images in the smallest training half."""
        groups = list(records.groups[selection])
        scores, n_train = {}, {}
        for name, row in rows.items():
            clean, adv = row.matrices(records)
            c, a, n = crossfit_scores(clean[selection], adv[selection], groups, seed=self.seed,
                                      repeats=self.repeats, fit=row.fit)
            scores[name], n_train[name] = (c, a), n
        return scores, n_train

    def score(self, records: AttackRecords) -> tuple[dict[str, Any], dict[str, Any], DetectionData | None]:
        """(the ``detection`` results, ROC curves per row, the CE detector's DetectionData)."""
        rows = self.rows(records)
        selection = records.pairs(self.pairs)
        groups = list(records.groups[selection])
        if len(set(groups)) < 4:
            return self._skipped(rows, selection, groups), {}, None
        scores, n_train = self.crossfit(rows, records, selection)
        detection: dict[str, Any] = {"pairs": self.pairs, "images": len(groups), "repeats": self.repeats}
        curves: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
        for name, (clean, adv) in scores.items():
            detection[name] = {
                **score_detector(clean, adv, groups, self.n_boot, self.seed),
                "n_train": n_train[name],
                "features": len(rows[name].features),
                **rows[name].detector.describe(),
            }
            fpr, tpr, _ = roc_curve(np.r_[np.zeros(len(clean)), np.ones(len(adv))], np.r_[clean, adv])
            curves[name] = (fpr, tpr, detection[name]["auroc"])
        # every detector that reads CE against every one that does not: the difference and its interval
        baselines = [n for n, row in rows.items() if not row.reads_ce]
        for name in (n for n, row in rows.items() if row.reads_ce):
            detection[name]["auroc_minus"] = {}
            for baseline in baselines:
                diff, low, high = auroc_difference(scores[name], scores[baseline], groups, self.n_boot, self.seed)
                detection[name]["auroc_minus"].update({baseline: diff, f"{baseline}_ci_low": low, f"{baseline}_ci_high": high})
        if self.pairs == "successful":  # the changed pairs too, as earlier studies scored them
            changed = records.pairs("changed")
            changed_groups = list(records.groups[changed])
            if len(set(changed_groups)) >= 4:
                changed_scores, _ = self.crossfit(rows, records, changed)
                detection["changed_pairs"] = {
                    name: {k: v for k, v in score_detector(c, a, changed_groups, self.n_boot, self.seed).items()
                           if k.startswith("auroc") or k == "n_test"}
                    for name, (c, a) in changed_scores.items()
                }
        return detection, curves, self._transfer_data(rows, records, selection)

    def _skipped(self, rows: Mapping[str, DetectorRow], selection: np.ndarray, groups: list[str]) -> dict[str, Any]:
        # an outcome of the run, not bad input: keep everything else it measured and say why
        reason = (
            f"detection needs {self.pairs} attack pairs from at least 4 patients (2 per cross-fit half), got "
            f"{len(set(groups))} ({int(selection.sum())} pairs): attack more test images (detection.test_images) or "
            "use a stronger attack (attack.eps), or set detection.pairs=changed or all"
        )
        log.warning("detection skipped: %s", reason)
        # the keys every attack run carries stay, as NaN, so sweeps and readers still find them
        detection: dict[str, Any] = {"pairs": self.pairs, "images": len(groups), "skipped": reason}
        for name, row in rows.items():
            detection[name] = {**dict.fromkeys(UNSCORED, nan), "n_test": int(selection.sum()), "n_train": 0,
                               "features": len(row.features), **row.detector.describe()}
        return detection

    def _transfer_data(self, rows: Mapping[str, DetectorRow], records: AttackRecords, selection: np.ndarray):
        """The CE detector's features of the selected pairs, saved for transfer between runs."""
        if "ce" not in rows:
            return None
        clean, adv = rows["ce"].matrices(records)
        return DetectionData(
            features_clean=clean[selection],
            features_adv=adv[selection],
            feature_names=[f for _, f in rows["ce"].features],
            ids=[str(i) for i in records.index[selection]],
            groups=list(records.groups[selection]),
            seed=self.seed,
        )
