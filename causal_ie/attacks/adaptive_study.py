"""Detection under an attacker who knows the CE detector (Carlini & Wagner 2017; Tramer et al. 2020).

After the attack study (:class:`~causal_ie.attacks.evaluation.AttackEvaluation`) has scored its
detectors on the non-adaptive adversarial images, this study asks whether the CE detector
survives an attacker who differentiates through it. The selected pairs' patients are split in
halves; for each half, every detector is fitted on the other patients' non-adaptive pairs,
and that half's clean images are attacked again by :class:`~causal_ie.attacks.adaptive.AdaptivePGD`
on the classification loss minus lambda times the fitted CE detector's logit (its features
differentiable, flips through BPDA). Every detector then scores the clean images against
their adaptive versions (those where the attack still reaches its goal). Only the CE
detector is attacked; the other detectors' AUROCs show how the same images transfer to them.

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

from causal_ie.attacks.adaptive import AdaptivePGD, logistic_logit
from causal_ie.attacks.detection import fit_detector, score_detector, split_halves
from causal_ie.attacks.evaluation import AttackEvaluation, Column
from causal_ie.attacks.factory import PER_IMAGE_TARGETS
from causal_ie.intervals import bootstrap_difference_ci, mean_ci, weighted_mean
from causal_ie.rows import group_code
from causal_ie.runtime import to_model

log = logging.getLogger(__name__)


class AdaptiveStudy:
    """The adaptive-attack part of the attack study (``attack.adaptive=true``).

    Args:
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
        images: int = 100,
        weights: Sequence[float] = (0.01, 0.1, 1.0),
        steps: int | None = None,
        selective: bool = True,
        margin: float = 0.0,
        batch_size: int = 4,
        seed: int = 0,
    ):
        if int(images) < 4:
            raise ValueError(f"detection.adaptive.images must be >= 4, got {images}")
        self.images, self.weights, self.steps = int(images), tuple(float(w) for w in weights), steps
        self.selective, self.margin = bool(selective), float(margin)
        self.batch_size, self.seed = int(batch_size), int(seed)

    def run(
        self, study: AttackEvaluation, classifier: nn.Module, dataset: Dataset, rows: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Results ``detection.adaptive``: per detector the AUROC (with intervals) of clean vs
        adaptive images, the attack's success rate and how many images it ran on."""
        if study.detector != "logistic":
            raise ValueError("attack.adaptive needs detection.detector=logistic (the attacker differentiates through it)")
        attack = study.attack
        if attack.target == "all":
            raise ValueError("attack.adaptive attacks one finding per image: use attack.target=top or a finding name")
        col: Mapping[Column, np.ndarray] = rows["columns"]
        selection: np.ndarray = rows["selection"]
        groups = np.array([str(int(g)) for g in col[("id", "group")]])
        chosen = self._choose(groups, selection)
        halves = split_halves(list(groups[chosen]), self.seed)
        codes = col[("id", "image")]
        items = _items_by_code(dataset, set(codes[chosen].astype(np.int64).tolist()))
        scores: dict[str, list[np.ndarray]] = {}
        clean_scores: dict[str, list[np.ndarray]] = {}
        pair_groups: list[str] = []
        attempted = succeeded = 0
        # per attacked image: did each attack reach its goal unseen by the CE detector (below its
        # 5 %-FPR threshold)? The rate a defender pays; paired on the same images.
        evaded: dict[str, list[np.ndarray]] = {"adaptive": [], "non_adaptive": []}
        evaded_groups: list[str] = []
        inputs = study.detector_matrices(col)  # every detector's (clean, adversarial) features of the plain pairs
        for part, half in enumerate((halves, ~halves), start=1):
            test = chosen[half]
            log.info("adaptive study, half %d of 2: %d image(s) of unseen patients", part, len(test))
            train = selection.copy()
            train[np.isin(groups, np.unique(groups[test]))] = False
            fitted = self._fit(study, inputs, train)
            ce_clean, ce_adv = inputs["ce"]
            # the operating point the attacker aims below: the fitted detector's 5 % FPR threshold
            threshold = float(np.quantile(fitted["ce"].decision_function(ce_clean[train]), 0.95))
            images = to_model(classifier, torch.stack([items[int(c)]["image"] for c in codes[test].astype(np.int64)]))
            labels = torch.stack([items[int(c)]["labels"] for c in codes[test].astype(np.int64)]).to(images.device)
            adversarial = self._attack(study, classifier, fitted["ce"], threshold, images, labels)
            attempted += len(test)
            ok = adversarial.success.cpu().numpy()
            succeeded += int(ok.sum())
            reached = (col[("outcome", "eligible")][test] > 0) & (col[("outcome", "success")][test] > 0)
            evaded["non_adaptive"].append(reached & (fitted["ce"].decision_function(ce_adv[test]) < threshold))
            evaded["adaptive"].append(ok & (adversarial.detector_logit.cpu().numpy() < threshold))
            evaded_groups += list(groups[test])
            if not ok.any():
                continue
            with torch.no_grad():
                probs = classifier(adversarial.images[ok]).sigmoid()
            adv_cols = study.detector_inputs(
                classifier, adversarial.images[ok], probs, torch.as_tensor(codes[test][ok]), "adv"
            )
            view = {key: value[test][ok] for key, value in col.items() if key[-1] == "clean"}
            view.update({key: value.detach().cpu().double().numpy() for key, value in adv_cols.items()})
            matrices = study.detector_matrices(view)
            for name, (clean, adv) in matrices.items():
                estimator = fitted[name]
                clean_scores.setdefault(name, []).append(estimator.predict_proba(clean)[:, 1])
                scores.setdefault(name, []).append(estimator.predict_proba(adv)[:, 1])
            pair_groups += list(groups[test][ok])
        out: dict[str, Any] = {
            "attacked": "ce",
            "images": attempted,
            "success_rate": succeeded / attempted if attempted else float("nan"),
            "weights": list(self.weights),
            "steps": int(self.steps or study.attack.params.get("steps", 10)),
            "selective": self.selective,
            "evasion": self._evasion(evaded, evaded_groups, study),
        }
        if len(set(pair_groups)) < 2:
            log.warning("the adaptive attack succeeded on images of fewer than 2 patients: no detection scores")
            return out
        for name in scores:
            out[name] = score_detector(
                np.concatenate(clean_scores[name]), np.concatenate(scores[name]), pair_groups, study.n_boot, study.seed
            )
        return out

    @staticmethod
    def _evasion(evaded: Mapping[str, list[np.ndarray]], groups: list[str], study: AttackEvaluation) -> dict[str, Any]:
        """Share of the attacked images where each attack reached its goal below the CE detector's
        threshold, and adaptive minus non-adaptive, with 95 % paired patient-bootstrap intervals."""
        adaptive = np.concatenate(evaded["adaptive"]).astype(float)
        non_adaptive = np.concatenate(evaded["non_adaptive"]).astype(float)
        out: dict[str, Any] = {"n": int(len(adaptive))}
        for name, values in (("adaptive", adaptive), ("non_adaptive", non_adaptive)):
            rate, low, high = mean_ci(values, groups, n_boot=study.n_boot, seed=study.seed)
            out.update({name: rate, f"{name}_ci_low": low, f"{name}_ci_high": high})
        diff, low, high = bootstrap_difference_ci(
            lambda a, b, weights: weighted_mean(a, weights), lambda a, b, weights: weighted_mean(b, weights),
            groups, adaptive, non_adaptive, n_boot=study.n_boot, seed=study.seed,
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

    def _fit(
        self, study: AttackEvaluation, inputs: Mapping[str, tuple[np.ndarray, np.ndarray]], train: np.ndarray
    ) -> dict[str, Any]:
        """Every detector fitted on the non-adaptive pairs ``train``."""
        fitted = {}
        for name, (clean, adv) in inputs.items():
            kind = "logistic" if name in study.baselines else study.detector
            fitted[name] = fit_detector(clean, adv, train, kind=kind, seed=study.seed)
        return fitted

    def _attack(
        self, study: AttackEvaluation, classifier: nn.Module, ce_detector: Any, threshold: float, images: Tensor,
        labels: Tensor,
    ):
        """The images attacked on their finding's loss minus lambda times ``ce_detector``'s logit."""
        names = [key[1] for key in study.columns if key[0] == "feature" and key[-1] == "clean"]
        logit_of = logistic_logit(ce_detector)

        def detector_logit(x: Tensor) -> Tensor:
            features = study.features(classifier, x, differentiable=True)
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


def _items_by_code(dataset: Dataset, codes: set[int]) -> dict[int, dict[str, Any]]:
    """The dataset's items whose image id hashes (:func:`group_code`) to one of ``codes``."""
    found: dict[int, dict[str, Any]] = {}
    for i in range(len(dataset)):  # type: ignore[arg-type]
        item = dataset[i]
        code = group_code(item["id"])
        if code in codes:
            found[code] = item
    missing = codes - set(found)
    if missing:
        raise RuntimeError(f"{len(missing)} attacked images are not in the test split any more: was it rebuilt?")
    return found
