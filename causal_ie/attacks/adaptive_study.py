"""Detection under an attacker who knows the detectors (Carlini & Wagner 2017; Tramer et al. 2020).

After the attack study (:class:`~causal_ie.attacks.evaluation.AttackEvaluation`) has scored its
detectors on the non-adaptive adversarial images, this study asks whether they survive an
attacker who knows them. ``detection.adaptive.against=all`` (the default) attacks the
classifier and every selected detector at once (:class:`~causal_ie.attacks.joint_logit.JointDetectorLogit`:
each detector's logit at its own 5 %-FPR threshold, selective steps over the detectors that
still flag the image, BPDA for non-differentiable steps, EOT over ``eot_samples`` draws for
randomised detectors); ``against=NAME`` attacks one detector.

The selected pairs' patients are split in halves; for each half, every detector is fitted on
the other patients' non-adaptive pairs, and that half's clean images are attacked again by
:class:`~causal_ie.attacks.adaptive.AdaptivePGD` on the classification loss minus lambda times
the joint logit. Every detector, as deployed (its own features, its threshold), then scores
the clean images against their adaptive versions. The figure that matters
(``evasion.all``): the share of attacked images that reach the attack's goal while no
detector flags them, beside each detector's own share (``evasion.<detector>``), each
against the non-adaptive attack on the same images.

A detector whose AUROC under this attack falls significantly (its interval's upper end below
the non-adaptive interval's lower end) is labelled as working against a non-adaptive attacker
only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from causal_ie import validators
from causal_ie.attacks.adaptive import AdaptivePGD
from causal_ie.attacks.detection import decision_scores, score_detector, split_halves
from causal_ie.attacks.detectors import CombinedDetector
from causal_ie.attacks.factory import PER_IMAGE_TARGETS
from causal_ie.attacks.joint_logit import JointDetectorLogit
from causal_ie.attacks.outcome import changed_share
from causal_ie.attacks.records import AttackRecords
from causal_ie.intervals import bootstrap_difference_ci, mean_ci, weighted_mean
from causal_ie.runtime import to_model

log = logging.getLogger(__name__)

__all__ = ["AdaptiveStudy"]


class AdaptiveStudy:
    """The adaptive-attack part of the attack study (``attack.adaptive=true``).

    Args:
        against: ``all`` (the classifier and every selected detector the attacker can
            differentiate through at once) or one name in ``detection.detectors``. A detector
            is attackable when it is ``differentiable`` and uses the logistic estimator (a
            combination when all its parts are differentiable).
        eot_samples: draws averaged per attacker call for randomised detectors (``noise_flip``).
        images: clean images attacked adaptively (whole patients, chosen by ``seed``; the
            differentiable CE of one image costs one forward and backward per window per
            baseline per step, so this bounds the study's time).
        weights: the attacker's lambda schedule (smallest first); an image stops at the first
            lambda that gets it past every attacked detector at its 5 %-FPR threshold.
        steps: PGD steps per lambda (null: the main attack's).
        selective: Bryniarski et al.'s selective steps: an image whose finding has already
            flipped steps on the detectors' logit alone (stronger than the fixed trade-off,
            which spends the budget pushing a detector far below its threshold).
        orthogonal: Bryniarski et al.'s orthogonal steps instead (:class:`AdaptivePGD`): the
            classification step without its component along the detectors' gradient until the
            flip, then the detectors' step without its component along the classification one.
        margin: logit margin past the decision boundary before a selective step (and how near
            its threshold a detector counts as still flagging the image).
        batch_size: images attacked at once (bounds memory).
        seed: patient choice, halves and random starts.
    """

    def __init__(
        self,
        against: str = "all",
        eot_samples: int = 4,
        images: int = 100,
        weights: Sequence[float] = (0.01, 0.1, 1.0),
        steps: int | None = None,
        selective: bool = True,
        orthogonal: bool = False,
        margin: float = 0.0,
        batch_size: int = 4,
        seed: int = 0,
    ):
        self.against = str(against)
        self.eot_samples = validators.count("detection.adaptive.eot_samples", eot_samples)
        self.images = validators.count("detection.adaptive.images", images, 4)
        self.weights = tuple(validators.number("detection.adaptive.weights", w, 0.0) for w in weights)
        self.steps = None if steps is None else validators.count("detection.adaptive.steps", steps)
        self.selective = bool(selective)
        self.orthogonal = bool(orthogonal)
        self.margin = validators.number("detection.adaptive.margin", margin, 0.0)
        self.batch_size = validators.count("detection.adaptive.batch_size", batch_size)
        self.seed = int(seed)

    # -- what is attacked ----------------------------------------------------------------
    @staticmethod
    def attackable(detection: Any, name: str) -> str | None:
        """None if the attacker can differentiate through detector ``name``, else why not."""
        detector = detection.detectors[name]
        if getattr(detector, "estimator", None) != "logistic":
            return f"its estimator is {getattr(detector, 'estimator', '?')!r}, the attacker differentiates logistic ones"
        parts = detector.combines(detection.computing) if isinstance(detector, CombinedDetector) else (name,)
        for part in parts:
            if not getattr(detection.detectors[part], "differentiable", False):
                return (f"{type(detection.detectors[part]).__name__} gives the attacker no gradient (set differentiable = "
                        "True and support features(..., differentiable=True))")
        return None

    def attacked(self, study: Any) -> tuple[list[str], dict[str, str]]:
        """(the detectors attacked, {detector: why it is not})."""
        detection = study.detection
        names = list(detection.detectors) if self.against == "all" else [self.against]
        why = {name: reason for name in names if (reason := self.attackable(detection, name))}
        return [n for n in names if n not in why], why

    def check(self, study: Any) -> None:
        """Fail before the test loop when the study cannot run on ``study`` (an AttackEvaluation)."""
        detectors = study.detection.detectors
        if self.against != "all" and self.against not in detectors:
            raise ValueError(
                f"detection.adaptive.against={self.against!r}: expected all or one of the selected detectors "
                f"({', '.join(detectors)})"
            )
        attacked, why = self.attacked(study)
        if self.against != "all" and why:
            raise ValueError(f"detection.adaptive.against={self.against!r}: {why[self.against]}")
        if not attacked:
            raise ValueError(f"detection.adaptive.against=all: no selected detector can be attacked ({why})")
        for name, reason in why.items():
            log.warning("the adaptive attacker does not attack detector %s: %s (it is still scored)", name, reason)
        if study.attack.target == "all":
            raise ValueError("attack.adaptive attacks one finding per image: use attack.target=top or a finding name")

    # -- the study -------------------------------------------------------------------------
    def run(self, study: Any, classifier: nn.Module, dataset: Dataset, records: AttackRecords,
            progress: Callable[[dict[str, Any]], None] | None = None,
            resume: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Results ``detection.adaptive``: per detector the AUROC (with intervals) of clean vs
        adaptive images, the evasion shares, the attack's success rate and how many images it
        ran on. ``study``: the AttackEvaluation whose ``records`` these are; ``dataset``: the
        test split they index.

        ``progress`` is called after every attacked batch (and each finished half) with the
        study's progress so far; passing it back as ``resume`` continues from there and gives
        the results of an uninterrupted run (the detectors' own random draws included)."""
        self.check(study)
        detection = study.detection
        attacked, not_attacked = self.attacked(study)
        rows, selection, chosen, halves, matrices = self._plan(detection, records)
        done: list[dict[str, Any]] = list(resume["halves"]) if resume is not None else []
        for part, half in enumerate((halves, ~halves), start=1):
            if part <= len(done):
                continue  # finished before the stop
            attack_resume = None
            if resume is not None:  # the first half to run after a stop: the draws as they were then
                _set_draws(detection.detectors, resume["draws"])
                attack_resume = resume.get("attack") if resume.get("half") == part else None
                resume = None

            def report(state: dict[str, Any], part: int = part) -> None:
                if progress is not None:
                    progress({"halves": done, "half": part, "attack": state, "draws": _draws(detection.detectors)})

            done.append(self._half(part, chosen[half], study, classifier, dataset, records, rows, matrices,
                                   selection, attacked, report, attack_resume))
            if progress is not None:
                progress({"halves": done, "half": part + 1, "attack": None, "draws": _draws(detection.detectors)})
        return self._results(done, attacked, not_attacked, study)

    def _plan(self, detection: Any, records: AttackRecords) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, Any]:
        """What both the study and :meth:`clean_flags` start from: the detectors' rows, the
        selected pairs, the chosen images (whole patients), their halves and the non-adaptive
        feature matrices."""
        rows = detection.rows(records)
        selection = records.pairs(detection.pairs)
        chosen = self._choose(records.groups, selection)
        halves = split_halves(list(records.groups[chosen]), self.seed)
        matrices = {name: row.matrices(records) for name, row in rows.items()}  # the non-adaptive pairs
        return rows, selection, chosen, halves, matrices

    def _half(self, part: int, test: np.ndarray, study: Any, classifier: nn.Module, dataset: Dataset,
              records: AttackRecords, rows: Mapping[str, Any], matrices: Mapping[str, Any], selection: np.ndarray,
              attacked: list[str], progress: Callable[[dict[str, Any]], None],
              resume: Mapping[str, Any] | None) -> dict[str, Any]:
        """One half: its clean images attacked against detectors fitted on the other patients,
        and what every detector, as deployed, makes of them."""
        detection = study.detection
        groups = records.groups
        log.info("adaptive study, half %d of 2: %d image(s) of unseen patients", part, len(test))
        fitted, thresholds = self._fit(test, records, rows, matrices, selection, detection)
        index = records.index[test]
        items = [dataset[int(i)] for i in index]
        images = to_model(classifier, torch.stack([item["image"] for item in items]))
        labels = torch.stack([item["labels"] for item in items]).to(images.device)
        joint = JointDetectorLogit(classifier, detection.detectors, rows, fitted, thresholds, attacked,
                                   self.eot_samples, self.margin)
        adversarial = self._attack(study, classifier, joint, images, labels, progress, resume)
        # reaching the goal counts only where the attack could change the image (as in the main study)
        ok = adversarial.success.cpu().numpy() & (records.outcome("eligible")[test] > 0)
        # every detector as deployed (its own features of the adaptive images, its threshold)
        with torch.no_grad():
            probs = classifier(adversarial.images).sigmoid()
        features = detection.features(classifier, adversarial.images, probs,
                                      torch.as_tensor(index, device=images.device), "adv")
        view = records.subset(test).with_side("adv", {k: v.detach().cpu().double().numpy() for k, v in features.items()})
        scored = self._scored_pairs(detection.pairs, ok, adversarial.images, images)
        out: dict[str, Any] = {"attempted": len(test), "succeeded": int(ok.sum()), "evaded_groups": list(groups[test]),
                               "pair_groups": list(groups[test][scored]), "clean": {}, "adv": {},
                               "evaded": {"adaptive": {}, "non_adaptive": {}}}
        for name, row in rows.items():
            clean, adv = row.matrices(view)
            below = decision_scores(fitted[name], adv) < thresholds[name]
            below_before = decision_scores(fitted[name], matrices[name][1][test]) < thresholds[name]
            out["evaded"]["adaptive"][name] = ok & below
            out["evaded"]["non_adaptive"][name] = records.reached_goal[test] & below_before
            if scored.any():  # a half may leave no pair to score (no attack reached its goal)
                out["clean"][name] = fitted[name].predict_proba(clean[scored])[:, 1]
                out["adv"][name] = fitted[name].predict_proba(adv[scored])[:, 1]
        deployed = list(detection.detectors)  # "no detector flags it": the detectors selected, not their views
        for side in ("adaptive", "non_adaptive"):  # unseen by every deployed detector at once
            out["evaded"][side]["all"] = np.all([out["evaded"][side][n] for n in deployed], axis=0)
        out["flagged_clean"] = self._flagged_clean(fitted, thresholds, matrices, test, deployed)
        return out

    @staticmethod
    def _fit(test: np.ndarray, records: AttackRecords, rows: Mapping[str, Any], matrices: Mapping[str, Any],
             selection: np.ndarray, detection: Any) -> tuple[dict[str, Any], dict[str, float]]:
        """Every detector fitted on the selected pairs of the other patients, and its operating
        point: the 5 % FPR threshold on their clean images."""
        groups = records.groups
        train = selection.copy()
        train[np.isin(groups, np.unique(groups[test]))] = False
        fitted = {name: row.fit(*matrices[name], train, detection.seed) for name, row in rows.items()}
        thresholds = {name: float(np.quantile(decision_scores(fitted[name], matrices[name][0][train]), 0.95))
                      for name in rows}
        return fitted, thresholds

    @staticmethod
    def _flagged_clean(fitted: Mapping[str, Any], thresholds: Mapping[str, float], matrices: Mapping[str, Any],
                       test: np.ndarray, deployed: Sequence[str]) -> dict[str, np.ndarray]:
        """Per detector, which of the ``test`` images it flags clean (its false positives), and
        ``any``: flagged by at least one deployed detector, the false positives of "all at once"."""
        out = {name: decision_scores(fitted[name], matrices[name][0][test]) >= thresholds[name] for name in fitted}
        out["any"] = np.any([out[n] for n in deployed], axis=0)
        return out

    def clean_flags(self, study: Any, records: AttackRecords) -> dict[str, Any]:
        """Without attacking: the share of the study's images (the same patients and halves as
        :meth:`run`) each detector flags clean at its threshold, and flagged by any, with 95 %
        patient-bootstrap intervals (``clean_flagged`` of :meth:`run`'s results)."""
        detection = study.detection
        rows, selection, chosen, halves, matrices = self._plan(detection, records)
        groups = records.groups
        flags, flag_groups = [], []
        for half in (halves, ~halves):
            test = chosen[half]
            fitted, thresholds = self._fit(test, records, rows, matrices, selection, detection)
            flags.append(self._flagged_clean(fitted, thresholds, matrices, test, list(detection.detectors)))
            flag_groups += list(groups[test])
        return self._flag_shares(flags, flag_groups, detection)

    @staticmethod
    def _flag_shares(flags: Sequence[Mapping[str, np.ndarray]], groups: list[str], detection: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"n": len(groups)}
        for name in flags[0]:
            rate, low, high = mean_ci(np.concatenate([f[name] for f in flags]).astype(float), groups,
                                      n_boot=detection.n_boot, seed=detection.seed)
            out.update({name: rate, f"{name}_ci_low": low, f"{name}_ci_high": high})
        return out

    def _results(self, halves: Sequence[Mapping[str, Any]], attacked: list[str], not_attacked: Mapping[str, str],
                 study: Any) -> dict[str, Any]:
        detection = study.detection
        attempted = sum(h["attempted"] for h in halves)
        succeeded = sum(h["succeeded"] for h in halves)
        evaded = {side: {name: [h["evaded"][side][name] for h in halves] for name in halves[0]["evaded"][side]}
                  for side in ("adaptive", "non_adaptive")}
        evaded_groups = [g for h in halves for g in h["evaded_groups"]]
        pair_groups = [g for h in halves for g in h["pair_groups"]]
        out: dict[str, Any] = {
            "against": self.against,
            "attacked": attacked,
            "not_attacked": sorted(not_attacked),
            "eot_samples": self.eot_samples,
            "images": attempted,
            "success_rate": succeeded / attempted if attempted else float("nan"),
            "weights": list(self.weights),
            "steps": int(self.steps or study.attack.params.get("steps", 10)),
            "selective": self.selective,
            "orthogonal": self.orthogonal,
            **self._evasion(evaded, evaded_groups, detection),
            # the false positives behind "all at once": clean images flagged by any detector
            **({"clean_flagged": self._flag_shares([h["flagged_clean"] for h in halves], evaded_groups, detection)}
               if all("flagged_clean" in h for h in halves) else {}),
            # per image, so two studies on the same images (selective, orthogonal) can be paired
            "per_image": {"groups": [str(g) for g in evaded_groups],
                          "evaded_all": [int(v) for v in np.concatenate(evaded["adaptive"]["all"])]},
        }
        if len(set(pair_groups)) < 2:
            log.warning("the adaptive attack gave %s pairs of fewer than 2 patients: no detection scores", detection.pairs)
            return out
        for name in halves[0]["evaded"]["adaptive"]:
            if name == "all":
                continue
            clean = [h["clean"][name] for h in halves if name in h["clean"]]
            adv = [h["adv"][name] for h in halves if name in h["adv"]]
            out[name] = score_detector(np.concatenate(clean), np.concatenate(adv), pair_groups, detection.n_boot,
                                       detection.seed)
        return out

    @staticmethod
    def _scored_pairs(pairs: str, success: np.ndarray, adversarial: Tensor, clean: Tensor) -> np.ndarray:
        """Which (clean, adaptive) pairs the AUROCs score, as ``detection.pairs`` says."""
        if pairs == "successful":
            return success
        if pairs == "changed":
            return (changed_share(adversarial, clean) > 0).cpu().numpy()
        return np.ones(len(success), dtype=bool)

    @staticmethod
    def _evasion(evaded: Mapping[str, Mapping[str, list[np.ndarray]]], groups: list[str], detection: Any) -> dict[str, Any]:
        """Per detector (and ``all``): the share of the attacked images that reached the goal
        below its threshold under the adaptive and the non-adaptive attack, and their paired
        difference, with 95 % patient-bootstrap intervals."""
        out: dict[str, Any] = {"evasion": {"n": len(groups)}, "non_adaptive_evasion": {}, "evasion_difference": {}}
        for name in evaded["adaptive"]:
            adaptive = np.concatenate(evaded["adaptive"][name]).astype(float)
            before = np.concatenate(evaded["non_adaptive"][name]).astype(float)
            for key, values in (("evasion", adaptive), ("non_adaptive_evasion", before)):
                rate, low, high = mean_ci(values, groups, n_boot=detection.n_boot, seed=detection.seed)
                out[key].update({name: rate, f"{name}_ci_low": low, f"{name}_ci_high": high})
            diff, low, high = bootstrap_difference_ci(
                lambda a, b, weights: weighted_mean(a, weights), lambda a, b, weights: weighted_mean(b, weights),
                groups, adaptive, before, n_boot=detection.n_boot, seed=detection.seed,
            )
            out["evasion_difference"].update({name: diff, f"{name}_ci_low": low, f"{name}_ci_high": high})
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

    def _attack(self, study: Any, classifier: nn.Module, joint: JointDetectorLogit, images: Tensor, labels: Tensor,
                progress: Callable[[dict[str, Any]], None] | None = None, resume: Mapping[str, Any] | None = None):
        """The images attacked on their finding's loss minus lambda times the joint margin logit
        (below 0: no attacked detector flags the image)."""
        attack = study.attack
        if attack.target in PER_IMAGE_TARGETS:
            with torch.no_grad():
                finding = attack.image_findings(classifier(images))
        else:
            finding = attack.finding_index(study.findings)
        adaptive = AdaptivePGD(
            joint,
            eps=float(attack.eps),
            steps=int(self.steps or attack.params.get("steps", 10)),
            selective=self.selective,
            orthogonal=self.orthogonal,
            margin=self.margin,
            alpha=attack.params.get("alpha") or None,  # eps = 0 makes it 0: AdaptivePGD derives it then
            norm=attack.norm,
            seed=self.seed,
            weight=self.weights,
            threshold=0.0,
            mode=attack.mode,
            to=attack.to,
            batch_size=self.batch_size,
        )
        return adaptive(classifier, images, labels, finding, progress=progress, resume=resume)


def _draws(detectors: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The state of every random generator the detectors hold (their draws for the attacker's
    calls, EOT), so a resumed study draws what an uninterrupted one would."""
    out: dict[str, dict[str, Any]] = {}
    for name, detector in detectors.items():
        for attr, value in vars(detector).items():
            if isinstance(value, np.random.Generator):
                out.setdefault(name, {})[attr] = value.bit_generator.state
            elif isinstance(value, torch.Generator):
                out.setdefault(name, {})[attr] = value.get_state()
    return out


def _set_draws(detectors: Mapping[str, Any], states: Mapping[str, Mapping[str, Any]]) -> None:
    for name, attrs in states.items():
        for attr, state in attrs.items():
            value = getattr(detectors[name], attr)
            if isinstance(value, np.random.Generator):
                value.bit_generator.state = state
            else:
                value.set_state(state)
