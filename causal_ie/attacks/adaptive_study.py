"""Detection under an attacker who knows a detector (Carlini & Wagner 2017; Tramer et al. 2020).

After the attack study (:class:`~causal_ie.attacks.evaluation.AttackEvaluation`) has scored its
detectors on the non-adaptive adversarial images, this study asks whether a detector
(``detection.adaptive.against``, by default the CE detector) survives an attacker who
differentiates through it. The selected pairs' patients are split in
halves; for each half, every detector is fitted on the other patients' non-adaptive pairs,
and that half's clean images are attacked again by :class:`~causal_ie.attacks.adaptive.AdaptivePGD`
on the classification loss minus lambda times the fitted detector's logit (its features
differentiable, non-differentiable steps through BPDA). Every detector then scores the clean
images against their adaptive versions (those where the attack still reaches its goal). Only
one detector is attacked; the other detectors' AUROCs show how the same images transfer to them.

A detector whose AUROC under this attack falls significantly (its interval's upper end below
the non-adaptive interval's lower end) is labelled as working against a non-adaptive attacker
only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from causal_ie import validators
from causal_ie.attacks.adaptive import AdaptivePGD, logistic_logit
from causal_ie.attacks.detection import score_detector, split_halves
from causal_ie.attacks.factory import PER_IMAGE_TARGETS
from causal_ie.attacks.records import AttackRecords
from causal_ie.intervals import bootstrap_difference_ci, mean_ci, weighted_mean
from causal_ie.runtime import to_model

log = logging.getLogger(__name__)


class AdaptiveStudy:
    """The adaptive-attack part of the attack study (``attack.adaptive=true``).

    Args:
        against: the detector the attacker differentiates through (a name in
            ``detection.detectors``; it must be differentiable and use the logistic estimator).
        images: clean images attacked adaptively (whole patients, chosen by ``seed``; the
            differentiable CE of one image costs one forward and backward per window per
            baseline per step, so this bounds the study's time).
        weights: the attacker's lambda schedule (smallest first); an image stops at the first
            lambda that gets it past the detector at its 5 %-FPR threshold (fitted half).
        steps: PGD steps per lambda (null: the main attack's).
        selective: Bryniarski et al.'s selective steps: an image whose finding has already
            flipped steps on the detector's logit alone (stronger than the fixed trade-off,
            which spends the budget pushing the detector far below its threshold).
        margin: logit margin past the decision boundary before a selective step.
        batch_size: images attacked at once (bounds memory).
        seed: patient choice, halves and random starts.
    """

    def __init__(
        self,
        against: str = "ce",
        images: int = 100,
        weights: Sequence[float] = (0.01, 0.1, 1.0),
        steps: int | None = None,
        selective: bool = True,
        margin: float = 0.0,
        batch_size: int = 4,
        seed: int = 0,
    ):
        self.against = str(against)
        self.images = validators.count("detection.adaptive.images", images, 4)
        self.weights = tuple(validators.number("detection.adaptive.weights", w, 0.0) for w in weights)
        self.steps = None if steps is None else validators.count("detection.adaptive.steps", steps)
        self.selective, self.margin = bool(selective), validators.number("detection.adaptive.margin", margin)
        self.batch_size = validators.count("detection.adaptive.batch_size", batch_size)
        self.seed = int(seed)

    def check(self, study: Any) -> None:
        """Fail before the test loop when the study cannot run on ``study`` (an AttackEvaluation)."""
        detectors = study.detection.detectors
        if self.against not in detectors:
            raise ValueError(
                f"detection.adaptive.against={self.against!r}: expected one of the selected detectors "
                f"({', '.join(detectors)})"
            )
        attacked = detectors[self.against]
        if not getattr(attacked, "differentiable", False):
            raise ValueError(
                f"detection.adaptive.against={self.against!r}: {type(attacked).__name__} gives the attacker no "
                "gradient (set differentiable = True and support features(..., differentiable=True))"
            )
        if getattr(attacked, "estimator", None) != "logistic":
            raise ValueError(
                f"attack.adaptive needs detection.detectors.{self.against}.estimator=logistic "
                "(the attacker differentiates through it)"
            )
        if study.attack.target == "all":
            raise ValueError("attack.adaptive attacks one finding per image: use attack.target=top or a finding name")

    def run(self, study: Any, classifier: nn.Module, dataset: Dataset, records: AttackRecords) -> dict[str, Any]:
        """Results ``detection.adaptive``: per detector the AUROC (with intervals) of clean vs
        adaptive images, the attack's success rate and how many images it ran on. ``study``: the
        AttackEvaluation whose ``records`` these are; ``dataset``: the test split they index."""
        self.check(study)
        detection = study.detection
        rows = detection.rows(records)
        selection = records.pairs(detection.pairs)
        groups = records.groups
        chosen = self._choose(groups, selection)
        halves = split_halves(list(groups[chosen]), self.seed)
        matrices = {name: row.matrices(records) for name, row in rows.items()}  # the non-adaptive pairs
        target = self.against
        scores: dict[str, list[np.ndarray]] = {}
        clean_scores: dict[str, list[np.ndarray]] = {}
        pair_groups: list[str] = []
        attempted = succeeded = 0
        # per attacked image: did each attack reach its goal unseen by the attacked detector (below
        # its 5 %-FPR threshold)? The rate a defender pays; paired on the same images.
        evaded: dict[str, list[np.ndarray]] = {"adaptive": [], "non_adaptive": []}
        evaded_groups: list[str] = []
        for part, half in enumerate((halves, ~halves), start=1):
            test = chosen[half]
            log.info("adaptive study, half %d of 2: %d image(s) of unseen patients", part, len(test))
            train = selection.copy()
            train[np.isin(groups, np.unique(groups[test]))] = False
            fitted = {name: row.fit(*matrices[name], train, detection.seed) for name, row in rows.items()}
            clean_target, adv_target = matrices[target]
            # the operating point the attacker aims below: the fitted detector's 5 % FPR threshold
            threshold = float(np.quantile(fitted[target].decision_function(clean_target[train]), 0.95))
            index = records.index[test]
            items = [dataset[int(i)] for i in index]
            images = to_model(classifier, torch.stack([item["image"] for item in items]))
            labels = torch.stack([item["labels"] for item in items]).to(images.device)
            names = [f for _, f in rows[target].features]
            adversarial = self._attack(study, classifier, fitted[target], names, threshold, images, labels)
            attempted += len(test)
            ok = adversarial.success.cpu().numpy()
            succeeded += int(ok.sum())
            evaded["non_adaptive"].append(records.reached_goal[test] & (fitted[target].decision_function(adv_target[test]) < threshold))
            evaded["adaptive"].append(ok & (adversarial.detector_logit.cpu().numpy() < threshold))
            evaded_groups += list(groups[test])
            if not ok.any():
                continue
            with torch.no_grad():
                probs = classifier(adversarial.images[ok]).sigmoid()
            features = detection.features(classifier, adversarial.images[ok], probs,
                                          torch.as_tensor(index[ok], device=images.device), "adv")
            view = records.subset(test[ok]).with_side(
                "adv", {k: v.detach().cpu().double().numpy() for k, v in features.items()}
            )
            for name, row in rows.items():
                clean, adv = row.matrices(view)
                clean_scores.setdefault(name, []).append(fitted[name].predict_proba(clean)[:, 1])
                scores.setdefault(name, []).append(fitted[name].predict_proba(adv)[:, 1])
            pair_groups += list(groups[test][ok])
        out: dict[str, Any] = {
            "attacked": target,
            "images": attempted,
            "success_rate": succeeded / attempted if attempted else float("nan"),
            "weights": list(self.weights),
            "steps": int(self.steps or study.attack.params.get("steps", 10)),
            "selective": self.selective,
            "evasion": self._evasion(evaded, evaded_groups, detection),
        }
        if len(set(pair_groups)) < 2:
            log.warning("the adaptive attack succeeded on images of fewer than 2 patients: no detection scores")
            return out
        for name in scores:
            out[name] = score_detector(np.concatenate(clean_scores[name]), np.concatenate(scores[name]), pair_groups,
                                       detection.n_boot, detection.seed)
        return out

    @staticmethod
    def _evasion(evaded: Mapping[str, list[np.ndarray]], groups: list[str], detection: Any) -> dict[str, Any]:
        """Share of the attacked images where each attack reached its goal below the CE detector's
        threshold, and adaptive minus non-adaptive, with 95 % paired patient-bootstrap intervals."""
        adaptive = np.concatenate(evaded["adaptive"]).astype(float)
        non_adaptive = np.concatenate(evaded["non_adaptive"]).astype(float)
        out: dict[str, Any] = {"n": int(len(adaptive))}
        for name, values in (("adaptive", adaptive), ("non_adaptive", non_adaptive)):
            rate, low, high = mean_ci(values, groups, n_boot=detection.n_boot, seed=detection.seed)
            out.update({name: rate, f"{name}_ci_low": low, f"{name}_ci_high": high})
        diff, low, high = bootstrap_difference_ci(
            lambda a, b, weights: weighted_mean(a, weights), lambda a, b, weights: weighted_mean(b, weights),
            groups, adaptive, non_adaptive, n_boot=detection.n_boot, seed=detection.seed,
        )
        out.update({"difference": diff, "difference_ci_low": low, "difference_ci_high": high})
        return out

    def _choose(self, groups: np.ndarray, selection: np.ndarray) -> np.ndarray:
        """Indices of the selected pairs of whole patients, shuffled by seed, up to ``images``."""
        patients = np.unique(groups[selection])
        order = np.random.default_rng(self.seed).permutation(len(patients))
        chosen: list[int] = []
        for p in patients[order]:
            if len(chosen) >= self.images:
                break
            chosen += np.flatnonzero(selection & (groups == p)).tolist()
        if len({groups[i] for i in chosen}) < 2:
            raise ValueError("attack.adaptive needs selected attack pairs of at least 2 patients")
        return np.array(sorted(chosen))

    def _attack(
        self, study: Any, classifier: nn.Module, estimator: Any, names: Sequence[str], threshold: float,
        images: Tensor, labels: Tensor,
    ):
        """The images attacked on their finding's loss minus lambda times the attacked detector's
        logit (its fitted logistic regression on its differentiable features ``names``)."""
        detector = study.detection.detectors[self.against]
        logit_of = logistic_logit(estimator)

        def detector_logit(x: Tensor) -> Tensor:
            features = detector.features(classifier, x, None, None, differentiable=True)
            return logit_of(torch.stack([features[n] for n in names], dim=1))

        attack = study.attack
        if attack.target in PER_IMAGE_TARGETS:
            with torch.no_grad():
                finding = attack.image_findings(classifier(images))
        else:
            finding = attack.finding_index(study.findings)
        adaptive = AdaptivePGD(
            detector_logit,
            eps=float(attack.eps),
            steps=int(self.steps or attack.params.get("steps", 10)),
            selective=self.selective,
            margin=self.margin,
            alpha=attack.params.get("alpha"),
            norm=attack.norm,
            seed=self.seed,
            weight=self.weights,
            threshold=threshold,
            mode=attack.mode,
            to=attack.to,
            batch_size=self.batch_size,
        )
        return adaptive(classifier, images, labels, finding)
