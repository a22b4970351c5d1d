"""AttackEvaluation: attack every test image, compare its CE maps clean vs adversarial, detect it.

Used by :class:`causal_ie.lightning.evaluation.CEEvaluation` when ``attack!=none``.
Per batch it runs the attack, the CE explainers on the clean and the
adversarial images, and keeps one row of numbers per image (statistics,
detector features, baseline scores). The rows are a torchmetrics state, so
under DDP every process attacks its shard and ``compute`` gathers them; the
detector is then fitted once on the gathered rows (patient-grouped halves).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.classification import MultilabelAUROC

from causal_ie.attacks.detection import (
    DETECTORS,
    DetectionData,
    detect,
    max_prob,
    prediction_change_under_noise,
)
from causal_ie.attacks.factory import Adversarial, MultiLabelAttack
from causal_ie.attacks.statistics import STATISTICS, box_share, ce_features, map_correlation, map_statistics
from causal_ie.explain.explainers import Explainer, select_maps
from causal_ie.models.findings import finding_aurocs

# per-image attack outcome columns (see _outcome)
OUTCOME_COLUMNS = ("eligible", "success", "flipped", "attacked", "linf", "l2", "l0")
# detectors that need no CE maps, fitted on the same splits as the CE detector
BASELINE_DETECTORS = ("max_prob", "noise_flip")
PAIRS = ("changed", "all")
# a column of the per-image rows: ("outcome", name), ("id", "group" | "image"),
# ("stat", explainer, statistic, side), ("feature", name, side), ("baseline", detector, side)
Column = tuple[str, ...]


def group_code(name: str) -> int:
    """A stable integer for a patient id, so groups travel as tensors between processes
    (48 bits: exact in the float64 rows)."""
    return int.from_bytes(hashlib.blake2b(str(name).encode(), digest_size=6).digest(), "little")


class _Rows(Metric):
    """Per-image rows [N, F], concatenated over batches and, on ``compute``, processes."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("rows", default=[], dist_reduce_fx="cat")

    def update(self, rows: Tensor) -> None:
        self.rows.append(rows.double())

    def compute(self) -> Tensor:
        if isinstance(self.rows, Tensor):  # already concatenated by the sync
            return self.rows
        return torch.cat(self.rows) if self.rows else torch.zeros(0, 0, dtype=torch.float64)


class AttackEvaluation(nn.Module):
    """Attack, CE under attack, and CE-based detection of the adversarial images.

    Args:
        attack: the configured attack.
        findings: the classifier's finding names.
        explainers: the CE explainers (``ce``, ``ce_latent``); their maps of every
            finding give the statistics and the detector features.
        detector: ``logistic`` or ``gbm``.
        noise_std, noise_draws: the ``noise_flip`` baseline.
        top_fraction: for the ``topk_mass`` statistic.
        examples: how many images to keep for the clean-vs-adversarial figure.
        pairs: ``changed`` fits and scores the detectors on the images the attack
            changed (APGD, Square and CW return the clean image where they fail,
            which would be a clean copy labelled adversarial); ``all`` on every image.
        repeats: detection scores are averaged over this many patient-grouped splits.
        seed: the first split's seed.
        missing_findings: findings the classifier does not predict (NaN logits): never the
            focus, left out of means over findings, NaN AUROC.
    """

    def __init__(
        self,
        attack: MultiLabelAttack,
        findings: Sequence[str],
        explainers: Mapping[str, Explainer],
        detector: str = "logistic",
        noise_std: float = 0.01,
        noise_draws: int = 4,
        top_fraction: float = 0.05,
        examples: int = 4,
        repeats: int = 5,
        pairs: str = "changed",
        seed: int = 0,
        missing_findings: Sequence[str] = (),
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
        self.explainers = dict(explainers)
        # bad detection settings fail here, not after a whole test epoch of attacks
        if detector not in DETECTORS:
            raise ValueError(f"detection.detector={detector!r}: expected one of {', '.join(DETECTORS)}")
        if pairs not in PAIRS:
            raise ValueError(f"detection.pairs={pairs!r}: expected one of {', '.join(PAIRS)}")
        for key, value, ok in (
            ("noise_std", noise_std, noise_std >= 0),
            ("noise_draws", noise_draws, int(noise_draws) >= 1),
            ("top_fraction", top_fraction, 0 < top_fraction <= 1),
            ("examples", examples, int(examples) >= 0),
            ("repeats", repeats, int(repeats) >= 1),
        ):
            if not ok:
                raise ValueError(f"detection.{key}={value!r} is out of range")
        self.detector, self.pairs = detector, pairs
        self.noise_std, self.noise_draws = float(noise_std), int(noise_draws)
        self.top_fraction, self.n_examples, self.repeats, self.seed = top_fraction, int(examples), int(repeats), seed
        self.auroc_adv = MultilabelAUROC(num_labels=len(self.findings), average=None)
        self.rows = _Rows()
        self.columns: list[Column] = []
        self.examples: list[dict[str, Any]] = []

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
        images, labels = batch["image"], batch["labels"]
        if clean_probs is None:
            with torch.no_grad():
                clean_probs = classifier(images).sigmoid()
        p_clean = clean_probs
        adv = self.attack(classifier, images, labels, self.findings)
        with torch.no_grad():
            p_adv = classifier(adv.images).sigmoid()
        self.auroc_adv.update(p_adv.nan_to_num(0.0), labels.long())
        focus = _focus_finding(adv.attacked, p_clean)
        boxes = batch["boxes"][torch.arange(len(focus), device=focus.device), focus]
        outcome = _outcome(adv, p_clean, p_adv, images).unbind(1)
        columns: dict[Column, Tensor] = {("outcome", name): v for name, v in zip(OUTCOME_COLUMNS, outcome)}
        # detector halves are patient-disjoint; an image without a patient id is its own patient
        patients = [p or i for p, i in zip(batch.get("patient_id", batch["id"]), batch["id"])]
        for column, names in (("group", patients), ("image", batch["id"])):
            columns[("id", column)] = torch.tensor(
                [float(group_code(g)) for g in names], dtype=torch.float64, device=images.device
            )
        focus_maps = {}  # per explainer: the focus finding's clean and adversarial maps [B, H, W]
        image_idx = torch.arange(len(focus), device=focus.device)
        for name, explainer in self.explainers.items():
            m_clean = clean_maps[name] if clean_maps and name in clean_maps else explainer.all_findings(classifier, images)
            m_adv = explainer.all_findings(classifier, adv.images)
            focus_maps[name] = (select_maps(m_clean, image_idx, focus), select_maps(m_adv, image_idx, focus))
            columns.update(self._map_columns(name, m_clean, m_adv, focus_maps[name], p_clean, p_adv, boxes))
        # one noise seed per image: the same noise in any batch or process
        seeds = [self.seed + int(c) for c in columns[("id", "image")].tolist()]
        for side, x, p in (("clean", images, p_clean), ("adv", adv.images, p_adv)):
            columns[("baseline", "max_prob", side)] = max_prob(p)
            columns[("baseline", "noise_flip", side)] = prediction_change_under_noise(
                classifier, x, std=self.noise_std, draws=self.noise_draws, seed=seeds
            )
        if not self.columns:
            self.columns = list(columns)
        elif list(columns) != self.columns:
            raise RuntimeError("attack evaluation columns changed between batches")
        self.rows.update(torch.stack([c.to(images.device).double() for c in columns.values()], dim=1))
        self._keep_examples(batch, adv, p_clean, p_adv, focus, focus_maps)

    def _map_columns(self, name, m_clean, m_adv, focus_maps, p_clean, p_adv, boxes) -> dict[Column, Tensor]:
        cols: dict[Column, Tensor] = {}
        # characterisation: the focus finding's map, clean vs adversarial
        for side, maps in zip(("clean", "adv"), focus_maps):
            for stat, value in map_statistics(maps, self.top_fraction).items():
                cols[("stat", name, stat, side)] = value
            cols[("stat", name, "box_share", side)] = box_share(maps, boxes)
        cols[("stat", name, "correlation_with_clean", "adv")] = map_correlation(*focus_maps)
        # detector features: from each input's own maps and probabilities only
        for side, maps, probs in (("clean", m_clean, p_clean), ("adv", m_adv, p_adv)):
            if maps.shape[1] == 1:  # one map for all findings (outcome=ece): "top" is that map
                probs = probs.amax(1, keepdim=True)
            for feature, value in ce_features(maps, probs, prefix=f"{name}.", top_fraction=self.top_fraction).items():
                cols[("feature", feature, side)] = value
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
        auroc_mean, per_finding = finding_aurocs(self.auroc_adv.compute(), self.predicted)
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
        return results, {"statistics": stats, "roc": curves, "detection_data": data, "examples": self.examples}

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

    def _characterisation(self, col: Mapping[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.explainers:
            out[name] = {}
            for stat in (*STATISTICS, "box_share"):
                clean, adv = col[("stat", name, stat, "clean")], col[("stat", name, stat, "adv")]
                out[name][stat] = {
                    "clean_mean": _nanmean(clean),
                    "adv_mean": _nanmean(adv),
                    # how well this one statistic alone separates the two (0.5: not at all)
                    "separation_auroc": _separation(clean, adv),
                }
            correlation = col[("stat", name, "correlation_with_clean", "adv")]
            out[name]["correlation_with_clean"] = {"adv_mean": _nanmean(correlation)}
        return out

    def _detection(self, col: Mapping[str, np.ndarray]):
        if self.pairs == "changed":
            keep = col[("outcome", "l0")] > 0
            col = {k: v[keep] for k, v in col.items()}
        groups = [str(int(g)) for g in col[("id", "group")]]
        if len(set(groups)) < 2:
            raise ValueError(
                f"detection needs images of at least 2 patients that the attack changed, got {len(set(groups))}: "
                "score more test images (data.test_subset) or a stronger attack (attack.eps)"
            )
        feats = sorted(key[1] for key in col if key[0] == "feature" and key[-1] == "clean")
        # `ce`: every CE feature (input-space and latent maps); with both, each alone as well (`ce_input`, `ce_latent`)
        sets = {"ce": feats}
        if len(self.explainers) > 1:
            for name in self.explainers:
                sets["ce_input" if name == "ce" else name] = [f for f in feats if f.startswith(f"{name}.")]
        detection: dict[str, Any] = {
            "detector": self.detector,
            "features": len(feats),
            "pairs": self.pairs,
            "images": len(groups),
        }
        curves: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
        for label, names in sets.items():
            clean = np.stack([col[("feature", f, "clean")] for f in names], axis=1)
            adv = np.stack([col[("feature", f, "adv")] for f in names], axis=1)
            detection[label], curves[label] = self._repeated(clean, adv, groups, self.detector)
        for baseline in BASELINE_DETECTORS:
            clean, adv = col[("baseline", baseline, "clean")], col[("baseline", baseline, "adv")]
            detection[baseline], curves[baseline] = self._repeated(clean[:, None], adv[:, None], groups, "logistic")
        data = DetectionData(
            features_clean=np.stack([col[("feature", f, "clean")] for f in feats], axis=1),
            features_adv=np.stack([col[("feature", f, "adv")] for f in feats], axis=1),
            feature_names=feats,
            # 48-bit codes of the image and patient ids (the rows travel between processes as floats)
            ids=[str(int(i)) for i in col[("id", "image")]],
            groups=groups,
            seed=self.seed,
        )
        return detection, curves, data

    def _repeated(self, clean: np.ndarray, adv: np.ndarray, groups: list[str], kind: str):
        """Detection scores averaged over ``repeats`` patient-grouped splits (seed, seed+1, ...):
        with a few hundred images one split's AUROC moves by several hundredths.
        The ROC curve is the first split's."""
        runs = [detect(clean, adv, groups, seed=self.seed + r, kind=kind) for r in range(self.repeats)]
        scores = runs[0].as_dict()
        aurocs = np.array([r.auroc for r in runs])
        scores.update(
            auroc=float(aurocs.mean()),
            **{"tpr@5fpr": float(np.mean([r.tpr_at_5fpr for r in runs]))},
            auroc_std=float(aurocs.std()),
            splits=self.repeats,
        )
        return scores, (runs[0].fpr, runs[0].tpr, runs[0].auroc)


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


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=float)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def _separation(clean: np.ndarray, adv: np.ndarray) -> float:
    keep_c, keep_a = clean[np.isfinite(clean)], adv[np.isfinite(adv)]
    if len(keep_c) == 0 or len(keep_a) == 0:
        return float("nan")
    y = np.r_[np.zeros(len(keep_c)), np.ones(len(keep_a))]
    return float(roc_auc_score(y, np.r_[keep_c, keep_a]))
