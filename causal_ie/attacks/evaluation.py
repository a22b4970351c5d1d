"""AttackEvaluation: attack every test image, compare its CE maps clean vs adversarial, detect it.

Used by :class:`causal_ie.lightning.evaluation.CEEvaluation` when ``attack!=none``.
Per batch it runs the attack, the CE explainers on the clean and the
adversarial images, and keeps one row of numbers per image (statistics,
detector features, baseline scores). The rows are a torchmetrics state, so
under DDP every process attacks its shard and ``compute`` gathers them; the
detectors are then cross-fitted once on the gathered rows (patient-grouped
halves, each scored by the detector fitted on the other) and scored with
patient-bootstrap intervals.
"""

from __future__ import annotations

import logging
from math import nan
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from torch import Tensor, nn
from torchmetrics.classification import MultilabelAUROC

from causal_ie.attacks.detection import (
    DETECTORS,
    DetectionData,
    auroc_difference,
    crossfit_scores,
    max_prob,
    prediction_change_under_noise,
    score_detector,
)
from causal_ie.attacks.detectors import MahalanobisDetector, feature_squeezing_score, penultimate_features
from causal_ie.attacks.factory import Adversarial, MultiLabelAttack
from causal_ie.attacks.features import CEFeatureExtractor
from causal_ie.attacks.statistics import STATISTICS, box_share, map_correlation, map_statistics
from causal_ie.explain.explainers import Explainer, select_maps
from causal_ie.models.findings import finding_aurocs
from causal_ie.precision import autocast, current_search_dtype, full_precision
from causal_ie.rows import Rows, group_code, patient_codes

log = logging.getLogger(__name__)

# per-image attack outcome columns (see _outcome)
OUTCOME_COLUMNS = ("eligible", "success", "flipped", "attacked", "linf", "l2", "l0")
# detectors that need no CE maps, fitted on the same splits as the CE detector (and mahalanobis)
BASELINE_DETECTORS = ("max_prob", "noise_flip", "feature_squeezing")
PAIRS = ("successful", "changed", "all")
# a column of the per-image rows: ("outcome", name), ("id", "group" | "image"),
# ("stat", explainer, statistic, side), ("feature", name, side), ("baseline", detector, side)
Column = tuple[str, ...]


class AttackEvaluation(nn.Module):
    """Attack, CE under attack, and detection of the adversarial images from CE and by the
    detectors the field already uses.

    Args:
        attack: the configured attack.
        findings: the classifier's finding names.
        explainers: the CE explainers (``ce``, ``ce_latent``): their maps of the attacked (or most
            likely) finding are compared clean vs adversarial (``ce_under_attack``) and drawn.
        features: the CE detector's features (:class:`~causal_ie.attacks.features.CEFeatureExtractor`:
            CE of every finding on coarse grids, from each image's own maps).
        detector: ``logistic`` or ``gbm``, fitted on the CE features (and on ``combined``).
        pairs: which (clean, adversarial) pairs the detectors are fitted and scored on:
            ``successful`` (the attack reached its goal: what the literature scores), ``changed``
            (the attack changed the image; APGD, Square and CW return the clean image where they
            fail) or ``all``. With ``successful``, the changed pairs are scored as well.
        noise_std, noise_draws: the ``noise_flip`` baseline.
        squeeze_bits, squeeze_median: the ``feature_squeezing`` baseline (Xu et al. 2018).
        mahalanobis: the ``mahalanobis`` baseline on the penultimate features (Lee et al. 2018),
            fitted to clean reference images by :meth:`fit_reference` (off: not scored).
        top_fraction: for the ``topk_mass`` statistic.
        examples: how many images to keep for the clean-vs-adversarial figure.
        repeats: each detector's out-of-sample scores are the mean over this many patient
            2-fold cross-fits (:func:`~causal_ie.attacks.detection.crossfit_scores`).
        n_boot: patient-bootstrap resamples of every interval.
        seed: the first split's seed (also of the bootstrap and the noise draws).
        missing_findings: findings the classifier does not predict (NaN logits): never the
            focus, left out of means over findings, NaN AUROC.
    """

    def __init__(
        self,
        attack: MultiLabelAttack,
        findings: Sequence[str],
        explainers: Mapping[str, Explainer],
        features: CEFeatureExtractor | None = None,
        detector: str = "logistic",
        pairs: str = "successful",
        noise_std: float = 0.01,
        noise_draws: int = 4,
        squeeze_bits: int = 5,
        squeeze_median: int = 2,
        mahalanobis: bool = True,
        top_fraction: float = 0.05,
        examples: int = 4,
        repeats: int = 2,
        n_boot: int = 2000,
        seed: int = 0,
        missing_findings: Sequence[str] = (),
        unlabelled_findings: Sequence[str] = (),
    ):
        super().__init__()
        if not explainers:
            raise ValueError("attack evaluation needs a CE explainer: set mask= (or latent=)")
        attack.finding_index(findings)  # an unknown attack.target fails before any work
        if attack.target in missing_findings:
            raise ValueError(
                f"attack.target={attack.target!r}: the classifier does not predict this finding; "
                f"expected one of {', '.join(f for f in findings if f not in missing_findings)}"
            )
        self.attack = attack
        self.findings = tuple(findings)
        self.predicted = torch.tensor([f not in missing_findings for f in self.findings])
        # outputs the data does not annotate are attacked (on the model's prediction) but not scored
        self.scored = self.predicted & torch.tensor([f not in unlabelled_findings for f in self.findings])
        self.explainers = dict(explainers)
        self.features = features if features is not None else CEFeatureExtractor()
        # bad detection settings fail here, not after a whole test epoch of attacks
        if detector not in DETECTORS:
            raise ValueError(f"detection.detector={detector!r}: expected one of {', '.join(DETECTORS)}")
        if pairs not in PAIRS:
            raise ValueError(f"detection.pairs={pairs!r}: expected one of {', '.join(PAIRS)}")
        for key, value, ok in (
            ("noise_std", noise_std, noise_std >= 0),
            ("noise_draws", noise_draws, int(noise_draws) >= 1),
            ("squeeze_bits", squeeze_bits, 1 <= int(squeeze_bits) <= 8),
            ("squeeze_median", squeeze_median, int(squeeze_median) >= 1),
            ("top_fraction", top_fraction, 0 < top_fraction <= 1),
            ("examples", examples, int(examples) >= 0),
            ("repeats", repeats, int(repeats) >= 1),
            ("n_boot", n_boot, int(n_boot) >= 100),
        ):
            if not ok:
                raise ValueError(f"detection.{key}={value!r} is out of range")
        self.detector, self.pairs = detector, pairs
        self.noise_std, self.noise_draws = float(noise_std), int(noise_draws)
        self.squeeze_bits, self.squeeze_median = int(squeeze_bits), int(squeeze_median)
        self.use_mahalanobis = bool(mahalanobis)
        self.mahalanobis: MahalanobisDetector | None = None
        self.top_fraction, self.n_examples, self.repeats, self.seed = top_fraction, int(examples), int(repeats), seed
        self.n_boot = int(n_boot)
        self.auroc_adv = MultilabelAUROC(num_labels=len(self.findings), average=None)
        self.rows = Rows()
        self.columns: list[Column] = []
        self.examples: list[dict[str, Any]] = []

    @property
    def baselines(self) -> tuple[str, ...]:
        """The detectors that need no CE maps, in report order."""
        return (*BASELINE_DETECTORS, *(("mahalanobis",) if self.use_mahalanobis else ()))

    def fit_reference(self, classifier: nn.Module, images: Iterable[Tensor]) -> int:
        """Fit the Mahalanobis baseline's Gaussian to the penultimate features of clean reference
        images (the validation split: none of them is a detection pair). Returns their number."""
        if not self.use_mahalanobis:
            return 0
        features = [penultimate_features(classifier, x) for x in images]
        if not features:
            raise ValueError("detection.mahalanobis needs reference images (the validation split is empty)")
        reference = torch.cat(features)
        self.mahalanobis = MahalanobisDetector().fit(reference)
        return len(reference)

    # -- per batch --------------------------------------------------------------
    def update(
        self,
        classifier: nn.Module,
        batch: Mapping[str, Any],
        clean_maps: Mapping[str, Tensor] | None = None,
        clean_probs: Tensor | None = None,
    ) -> None:
        """Attack ``batch`` and record one row per image. ``clean_maps`` (maps [B, K, H, W])
        and ``clean_probs`` ([B, K]) of the clean images may come from the caller."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError("attacks need gradients: set trainer.inference_mode=false (evaluate.yaml does)")
        if self.use_mahalanobis and self.mahalanobis is None:
            raise RuntimeError("detection.mahalanobis needs fit_reference(classifier, images) first (evaluate.py does it)")
        images, labels = batch["image"], batch["labels"]
        # the attack is a search (it may run under the trainer's bf16 autocast); everything it is
        # judged by is measured in float32 (causal_ie.precision)
        search = current_search_dtype(images.device)
        with full_precision(images.device):
            self._update(classifier, batch, images, labels, clean_maps, clean_probs, search)

    def _update(self, classifier, batch, images, labels, clean_maps, clean_probs, search) -> None:
        with torch.no_grad():
            logits_clean = classifier(images)
        p_clean = logits_clean.sigmoid() if clean_probs is None else clean_probs
        with autocast(search, images.device):
            adv = self.attack(classifier, images, labels, self.findings)
        with torch.no_grad():
            logits_adv = classifier(adv.images)
        p_adv = logits_adv.sigmoid()
        self.auroc_adv.update(p_adv.nan_to_num(0.0), labels.nan_to_num(0.0).long())
        focus = _focus_finding(adv.attacked, p_clean)
        image_idx = torch.arange(len(focus), device=focus.device)
        boxes = batch["boxes"][image_idx, focus]
        outcome = _outcome(adv, p_clean, p_adv, images).unbind(1)
        columns: dict[Column, Tensor] = {("outcome", name): v for name, v in zip(OUTCOME_COLUMNS, outcome)}
        # detector halves are patient-disjoint; an image without a patient id is its own patient
        columns[("id", "group")] = patient_codes(batch, images.device)
        columns[("id", "image")] = torch.tensor(
            [float(group_code(i)) for i in batch["id"]], dtype=torch.float64, device=images.device
        )
        # the control beside the map statistics: the focus finding's own logit
        for side, logits in (("clean", logits_clean), ("adv", logits_adv)):
            columns[("stat", "classifier", "focus_logit", side)] = logits[image_idx, focus]
        focus_maps = {}  # per explainer: the focus finding's clean and adversarial maps [B, H, W]
        for name, explainer in self.explainers.items():
            m_clean = clean_maps[name] if clean_maps and name in clean_maps else explainer.all_findings(classifier, images)
            m_adv = explainer.all_findings(classifier, adv.images)
            focus_maps[name] = (select_maps(m_clean, image_idx, focus), select_maps(m_adv, image_idx, focus))
            columns.update(self._map_statistics(name, focus_maps[name], boxes))
        for side, x, p in (("clean", images, p_clean), ("adv", adv.images, p_adv)):
            columns.update(self.detector_inputs(classifier, x, p, columns[("id", "image")], side))
        if not self.columns:
            self.columns = list(columns)
        elif list(columns) != self.columns:
            raise RuntimeError("attack evaluation columns changed between batches")
        self.rows.update(torch.stack([c.to(images.device).double() for c in columns.values()], dim=1))
        self._keep_examples(batch, adv, p_clean, p_adv, focus, focus_maps)

    def detector_inputs(
        self, classifier: nn.Module, x: Tensor, probs: Tensor, image_codes: Tensor, side: str
    ) -> dict[Column, Tensor]:
        """What every detector reads of images ``x``: the CE features and the baselines' scores
        (``probs``: the classifier's probabilities on ``x``; ``image_codes``: per image, seeding
        its noise draws, so an image gets the same noise in any batch or process)."""
        seeds = [self.seed + int(c) for c in image_codes.tolist()]
        columns: dict[Column, Tensor] = {
            ("feature", feature, side): value for feature, value in self.features(classifier, x).items()
        }
        columns[("baseline", "max_prob", side)] = max_prob(probs)
        columns[("baseline", "noise_flip", side)] = prediction_change_under_noise(
            classifier, x, std=self.noise_std, draws=self.noise_draws, seed=seeds
        )
        columns[("baseline", "feature_squeezing", side)] = feature_squeezing_score(
            classifier, x, bit_depth=self.squeeze_bits, median_size=self.squeeze_median
        )
        if self.mahalanobis is not None:
            scores = self.mahalanobis.score(penultimate_features(classifier, x))
            columns[("baseline", "mahalanobis", side)] = scores.to(x.device)
        return columns

    def _map_statistics(self, name: str, focus_maps: tuple[Tensor, Tensor], boxes: Tensor) -> dict[Column, Tensor]:
        """The focus finding's map, clean vs adversarial: statistics, box share, correlation."""
        cols: dict[Column, Tensor] = {}
        for side, maps in zip(("clean", "adv"), focus_maps):
            for stat, value in map_statistics(maps, self.top_fraction).items():
                cols[("stat", name, stat, side)] = value
            cols[("stat", name, "box_share", side)] = box_share(maps, boxes)
        cols[("stat", name, "correlation_with_clean", "adv")] = map_correlation(*focus_maps)
        return cols

    def _keep_examples(self, batch, adv: Adversarial, p_clean, p_adv, focus, focus_maps) -> None:
        for i in range(len(focus)):
            if len(self.examples) >= self.n_examples:
                return
            k = int(focus[i])
            self.examples.append(
                {
                    "id": str(batch["id"][i]),
                    "finding": self.findings[k],
                    "prob_clean": float(p_clean[i, k]),
                    "prob_adv": float(p_adv[i, k]),
                    "image_clean": batch["image"][i, 0].float().cpu().numpy(),
                    "image_adv": adv.images[i, 0].float().cpu().numpy(),
                    "box": batch["boxes"][i, k].cpu().tolist(),
                    "maps": {
                        name: tuple(m[i].float().cpu().numpy() for m in pair) for name, pair in focus_maps.items()
                    },
                }
            )

    # -- after the epoch -----------------------------------------------------------
    def compute(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(results, artefacts): the ``attack``, ``ce_under_attack`` and ``detection`` results,
        and what the figures and the transfer analysis need (arrays, ROC curves, DetectionData)."""
        rows = self.rows.compute().cpu().numpy()
        self.rows.reset()
        auroc_mean, per_finding = finding_aurocs(self.auroc_adv.compute(), self.scored)
        self.auroc_adv.reset()
        if rows.size == 0:
            raise RuntimeError("attack evaluation saw no test images")
        col = {key: rows[:, j] for j, key in enumerate(self.columns)}
        results = {
            "attack": self._attack_results(col, auroc_mean, per_finding),
            "ce_under_attack": self._characterisation(col),
        }
        detection, curves, data = self._detection(col)
        results["detection"] = detection
        stat_keys = [key for key in self.columns if key[0] == "stat" and key[-1] == "clean"]
        stats = {side: {f"{key[1]}.{key[2]}": col[(*key[:3], side)] for key in stat_keys} for side in ("clean", "adv")}
        # the per-image rows and the pairs the detectors saw: the adaptive study refits from them
        rows_kept = {"columns": col, "selection": self._pair_selection(col, self.pairs)}
        return results, {"statistics": stats, "roc": curves, "detection_data": data, "examples": self.examples,
                         "rows": rows_kept}

    def _attack_results(self, col: Mapping[Column, np.ndarray], auroc_mean: float, per_finding: list[float]) -> dict[str, Any]:
        eligible = col[("outcome", "eligible")] > 0
        a = self.attack
        return {
            "name": a.name,
            "target": a.target,
            "mode": a.mode if a.mode == "untargeted" else f"targeted:{a.to}",
            "eps": a.eps,
            "norm": a.norm,
            # among images the attack could change (untargeted: attacked findings right on
            # clean; targeted: not yet at the goal), the share where it reached its goal
            "success_rate": float(col[("outcome", "success")][eligible].mean()) if eligible.any() else float("nan"),
            "eligible_images": int(eligible.sum()),
            "num_images": int(len(eligible)),
            # share of attacked (image, finding) predictions that changed at threshold 0.5
            "flip_rate": float(col[("outcome", "flipped")].sum() / max(col[("outcome", "attacked")].sum(), 1)),
            "auroc_mean": auroc_mean,
            "auroc": dict(zip(self.findings, per_finding)),
            "perturbation": {k: float(np.mean(col[("outcome", k)])) for k in ("linf", "l2", "l0")},
        }

    def _characterisation(self, col: Mapping[Column, np.ndarray]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.explainers:
            out[name] = {}
            for stat in (*STATISTICS, "box_share"):
                out[name][stat] = _shift(col[("stat", name, stat, "clean")], col[("stat", name, stat, "adv")])
            correlation = col[("stat", name, "correlation_with_clean", "adv")]
            out[name]["correlation_with_clean"] = {"adv_mean": _nanmean(correlation)}
        # the control: how well the focus finding's logit alone separates (the statistics above
        # know which finding was attacked, and CE partly re-encodes its confidence)
        logit = _shift(col[("stat", "classifier", "focus_logit", "clean")], col[("stat", "classifier", "focus_logit", "adv")])
        out["classifier"] = {"focus_logit": logit}
        return out

    def _pair_selection(self, col: Mapping[Column, np.ndarray], pairs: str) -> np.ndarray:
        if pairs == "successful":
            return (col[("outcome", "eligible")] > 0) & (col[("outcome", "success")] > 0)
        if pairs == "changed":
            return col[("outcome", "l0")] > 0
        return np.ones(len(col[("outcome", "l0")]), dtype=bool)

    def detector_matrices(self, col: Mapping[Column, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """(clean [N, F], adversarial [N, F]) per detector: ``ce`` (every CE feature), ``ce_pixel`` /
        ``ce_latent`` (each view alone, when there is a latent one), the baselines (one score each)
        and ``combined`` (CE and every baseline)."""
        feats = [key[1] for key in self.columns if key[0] == "feature" and key[-1] == "clean"]

        def stack(names: Sequence[str], kind: str = "feature") -> tuple[np.ndarray, np.ndarray]:
            return tuple(np.stack([col[(kind, f, side)] for f in names], axis=1) for side in ("clean", "adv"))  # type: ignore[return-value]

        inputs = {"ce": stack(feats)}
        latent = [f for f in feats if f.startswith(("latent.", "agreement."))]
        if latent and len(latent) < len(feats):
            inputs["ce_pixel"] = stack([f for f in feats if f not in latent])
            inputs["ce_latent"] = stack(latent)
        for baseline in self.baselines:
            inputs[baseline] = stack([baseline], kind="baseline")
        parts = [inputs["ce"], *(inputs[b] for b in self.baselines)]
        inputs["combined"] = (np.concatenate([p[0] for p in parts], 1), np.concatenate([p[1] for p in parts], 1))
        return inputs

    def _scores(self, inputs, groups, selection):
        """Out-of-sample (cross-fitted) scores of every detector on the selected pairs."""
        scores, n_train = {}, {}
        for name, (clean, adv) in inputs.items():
            kind = "logistic" if name in self.baselines else self.detector
            c, a, n = crossfit_scores(clean[selection], adv[selection], groups, kind=kind, seed=self.seed, repeats=self.repeats)
            scores[name], n_train[name] = (c, a), n
        return scores, n_train

    def _detection(self, col: Mapping[Column, np.ndarray]):
        selection = self._pair_selection(col, self.pairs)
        all_groups = [str(int(g)) for g in col[("id", "group")]]
        groups = [g for g, keep in zip(all_groups, selection) if keep]
        if len(set(groups)) < 4:
            # an outcome of the run, not bad input: keep everything else it measured and say why
            reason = (
                f"detection needs {self.pairs} attack pairs from at least 4 patients (2 per cross-fit half), got "
                f"{len(set(groups))} ({int(selection.sum())} pairs): attack more test images (detection.test_images) or "
                "use a stronger attack (attack.eps), or set detection.pairs=changed or all"
            )
            log.warning("detection skipped: %s", reason)
            # the keys every attack run carries stay, as NaN, so sweeps and readers still find them
            unscored = {key: nan for key in ("auroc", "auroc_ci_low", "auroc_ci_high",
                                             "tpr@5fpr", "tpr@5fpr_ci_low", "tpr@5fpr_ci_high")}
            detection = {"pairs": self.pairs, "images": len(groups), "skipped": reason}
            for name in self.detector_matrices(col):
                detection[name] = {**unscored, "n_test": int(selection.sum()), "n_train": 0}
            return detection, {}, None
        inputs = self.detector_matrices(col)
        scores, n_train = self._scores(inputs, groups, selection)
        detection: dict[str, Any] = {
            "detector": self.detector,
            "features": int(inputs["ce"][0].shape[1]),
            "pairs": self.pairs,
            "images": len(groups),
            "repeats": self.repeats,
        }
        curves: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
        for name, (clean, adv) in scores.items():
            detection[name] = {**score_detector(clean, adv, groups, self.n_boot, self.seed), "n_train": n_train[name]}
            fpr, tpr, _ = roc_curve(np.r_[np.zeros(len(clean)), np.ones(len(adv))], np.r_[clean, adv])
            curves[name] = (fpr, tpr, detection[name]["auroc"])
        # every detector that uses CE against every baseline: the difference and its interval
        for name in (n for n in scores if n not in self.baselines):
            detection[name]["auroc_minus"] = {}
            for baseline in self.baselines:
                diff, low, high = auroc_difference(scores[name], scores[baseline], groups, self.n_boot, self.seed)
                detection[name]["auroc_minus"].update(
                    {baseline: diff, f"{baseline}_ci_low": low, f"{baseline}_ci_high": high}
                )
        if self.pairs == "successful":  # the changed pairs too, as earlier studies scored them
            changed = self._pair_selection(col, "changed")
            changed_groups = [g for g, keep in zip(all_groups, changed) if keep]
            if len(set(changed_groups)) >= 4:
                changed_scores, _ = self._scores(inputs, changed_groups, changed)
                detection["changed_pairs"] = {
                    name: {k: v for k, v in score_detector(c, a, changed_groups, self.n_boot, self.seed).items()
                           if k.startswith("auroc") or k == "n_test"}
                    for name, (c, a) in changed_scores.items()
                }
        clean, adv = inputs["ce"]
        data = DetectionData(
            features_clean=clean[selection],
            features_adv=adv[selection],
            feature_names=[key[1] for key in self.columns if key[0] == "feature" and key[-1] == "clean"],
            # 48-bit codes of the image and patient ids (the rows travel between processes as floats)
            ids=[str(int(i)) for i, keep in zip(col[("id", "image")], selection) if keep],
            groups=groups,
            seed=self.seed,
        )
        return detection, curves, data


def _focus_finding(attacked: Tensor, probs: Tensor) -> Tensor:
    """The finding whose maps are compared: the attacked one, or (all findings attacked)
    the most likely one on the clean image (a missing finding's NaN never wins)."""
    single = attacked.sum(1) == 1
    return torch.where(single, attacked.float().argmax(1), probs.nan_to_num(float("-inf")).argmax(1))


def _outcome(adv: Adversarial, p_clean: Tensor, p_adv: Tensor, images: Tensor) -> Tensor:
    """Per image: eligible, success, flipped and attacked counts, and L-inf/L2/L0 of the change."""
    att = adv.attacked
    pred_clean, pred_adv = p_clean > 0.5, p_adv > 0.5
    goal = adv.goal > 0.5
    at_goal_clean = ((pred_clean == goal) | ~att).all(1)
    at_goal_adv = ((pred_adv == goal) | ~att).all(1)
    if adv.targeted:
        eligible, success = ~at_goal_clean, at_goal_adv
    else:  # the goal is the true label: success = some attacked finding now wrong
        eligible, success = at_goal_clean, ~at_goal_adv
    flipped = ((pred_clean != pred_adv) & att).sum(1)
    delta = (adv.images - images).flatten(1)
    return torch.stack(
        [
            eligible.double(),
            success.double(),
            flipped.double(),
            att.sum(1).double(),
            delta.abs().amax(1).double(),
            delta.norm(dim=1).double(),
            (delta.abs() > 1e-6).double().mean(1),
        ],
        dim=1,
    )


def _shift(clean: np.ndarray, adv: np.ndarray) -> dict[str, float]:
    """A statistic clean vs adversarial: both means, and how well it alone separates them."""
    return {"clean_mean": _nanmean(clean), "adv_mean": _nanmean(adv), "separation_auroc": _separation(clean, adv)}


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=float)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def _separation(clean: np.ndarray, adv: np.ndarray) -> float:
    keep_c, keep_a = clean[np.isfinite(clean)], adv[np.isfinite(adv)]
    if len(keep_c) == 0 or len(keep_a) == 0:
        return float("nan")
    y = np.r_[np.zeros(len(keep_c)), np.ones(len(keep_a))]
    return float(roc_auc_score(y, np.r_[keep_c, keep_a]))
