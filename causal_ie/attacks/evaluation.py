"""AttackEvaluation: attack every test image, compare its CE maps clean vs adversarial, detect it.

Used by :class:`causal_ie.lightning.evaluation.CEEvaluation` when ``attack!=none``; built from
the ``detection`` config. The study's parts, one module each:

- the attack and its per-image outcome (:mod:`causal_ie.attacks.outcome`);
- CE under attack, the focus finding's map clean vs adversarial (:mod:`causal_ie.attacks.ce_under_attack`);
- detection: every selected detector cross-fitted and scored (:mod:`causal_ie.attacks.detection_study`);
- the adaptive attacker (:mod:`causal_ie.attacks.adaptive_study`), run after the rest is saved.

Per batch it runs the attack, the CE explainers on the clean and the adversarial images and
every detector, and keeps one record per image (:mod:`causal_ie.attacks.records`: named
columns, ids are dataset indices). The records are a torchmetrics state, so under DDP every
process attacks its shard and ``compute`` gathers them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from causal_ie import validators
from causal_ie.attacks.ce_under_attack import ce_under_attack, map_columns
from causal_ie.attacks.detection_study import DetectionStudy
from causal_ie.attacks.detectors import Detector
from causal_ie.attacks.factory import Adversarial, MultiLabelAttack
from causal_ie.attacks.outcome import attack_outcome, attack_results, focus_finding
from causal_ie.attacks.records import Column, RecordCollector
from causal_ie.explain.explainers import Explainer, select_maps
from causal_ie.models.findings import finding_aurocs
from causal_ie.precision import autocast, current_search_dtype, full_precision
from causal_ie.rows import patient_codes
from causal_ie.models.auroc import auroc_targets, label_auroc

class AttackEvaluation(nn.Module):
    """The attack study: attack, CE under attack, detection, and (with ``attack.adaptive``) the
    adaptive attacker.

    Args:
        attack: the configured attack.
        findings: the classifier's finding names.
        explainers: the CE explainers (``ce``, ``ce_latent``): their maps of the attacked (or most
            likely) finding are compared clean vs adversarial (``ce_under_attack``) and drawn.
        detectors: name -> detector (``detection.detectors``; see :mod:`causal_ie.attacks.detectors`).
        pairs, repeats, n_boot: how the detectors are scored (:class:`~causal_ie.attacks.detection_study.DetectionStudy`).
        adaptive: the adaptive study (:class:`~causal_ie.attacks.adaptive_study.AdaptiveStudy`), run
            by evaluate.py after the rest is saved when ``attack.adaptive`` is true.
        test_images: test images attacked (None: the whole test split).
        reference_images: clean validation images the detectors that need them are fitted on.
        top_fraction: for the ``topk_mass`` statistic.
        examples: how many images to keep for the clean-vs-adversarial figure.
        seed: the detectors' first split's seed (also of the bootstrap).
        missing_findings: findings the classifier does not predict (NaN logits): never the
            focus, left out of means over findings, NaN AUROC.
        unlabelled_findings: outputs the data does not annotate: attacked (on the model's
            prediction) but not scored.
    """

    def __init__(
        self,
        attack: MultiLabelAttack,
        findings: Sequence[str],
        explainers: Mapping[str, Explainer],
        detectors: Mapping[str, Detector],
        pairs: str = "successful",
        repeats: int = 2,
        n_boot: int = 2000,
        adaptive: Any = None,
        test_images: int | None = None,
        reference_images: int = 500,
        top_fraction: float = 0.05,
        examples: int = 4,
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
        # bad detection settings fail here, not after a whole test epoch of attacks
        self.detection = DetectionStudy(detectors, pairs=pairs, repeats=repeats, n_boot=n_boot, seed=seed)
        self.adaptive = adaptive
        self.test_images = None if test_images is None else validators.count("detection.test_images", test_images)
        self.reference_images = validators.count("detection.reference_images", reference_images, 0)
        self.top_fraction = validators.number("detection.top_fraction", top_fraction, 0.0, 1.0, low_open=True)
        self.n_examples = validators.count("detection.examples", examples, 0)
        self.auroc_adv = label_auroc(len(self.findings))
        self.records = RecordCollector()
        self.examples: list[dict[str, Any]] = []

    def fit_reference(self, classifier: nn.Module, images: Sequence[Tensor]) -> int:
        """Fit the detectors that need clean reference images (the validation split: none of
        them is a detection pair). Returns their number."""
        return self.detection.fit_reference(classifier, images)

    # -- resumable test loop (its metrics are saved with CEEvaluation's) ------------------
    def loop_state(self) -> dict[str, Any]:
        """What the study holds besides its metrics: the figures' examples, the record columns."""
        return {"examples": self.examples, "columns": self.records.names}

    def load_loop_state(self, saved: Mapping[str, Any]) -> None:
        self.examples = list(saved["examples"])
        self.records.names = list(saved["columns"])

    # -- per batch --------------------------------------------------------------
    def update(
        self,
        classifier: nn.Module,
        batch: Mapping[str, Any],
        clean_maps: Mapping[str, Tensor] | None = None,
        clean_probs: Tensor | None = None,
    ) -> None:
        """Attack ``batch`` and record one row per image. ``clean_maps`` (maps [B, K, H, W])
        and ``clean_probs`` ([B, K]) of the clean images may come from the caller. The batch
        carries ``index``, the images' dataset indices (the test loader adds them)."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError("attacks need gradients: set trainer.inference_mode=false (evaluate.yaml does)")
        if "index" not in batch:
            raise KeyError("the attack study needs each image's dataset index in batch['index'] (IndexedDataset adds it)")
        images = batch["image"]
        # the attack is a search (it may run under the trainer's bf16 autocast); everything it is
        # judged by is measured in float32 (causal_ie.precision)
        search = current_search_dtype(images.device)
        with full_precision(images.device):
            self._update(classifier, batch, clean_maps, clean_probs, search)

    def _update(self, classifier, batch, clean_maps, clean_probs, search) -> None:
        images, labels = batch["image"], batch["labels"]
        with torch.no_grad():
            logits_clean = classifier(images)
        p_clean = logits_clean.sigmoid() if clean_probs is None else clean_probs
        with autocast(search, images.device):
            adv = self.attack(classifier, images, labels, self.findings)
        with torch.no_grad():
            logits_adv = classifier(adv.images)
        p_adv = logits_adv.sigmoid()
        self.auroc_adv.update(p_adv.nan_to_num(0.0), auroc_targets(labels))
        focus = focus_finding(adv.attacked, p_clean)
        image_idx = torch.arange(len(focus), device=focus.device)
        index = torch.as_tensor(batch["index"], device=images.device)
        columns: dict[Column, Tensor] = {("id", "index"): index.double(), ("id", "group"): patient_codes(batch, images.device)}
        columns.update({("outcome", name): v for name, v in attack_outcome(adv, p_clean, p_adv, images).items()})
        # the control beside the map statistics: the focus finding's own logit
        for side, logits in (("clean", logits_clean), ("adv", logits_adv)):
            columns[("stat", "classifier", "focus_logit", side)] = logits[image_idx, focus]
        focus_maps = {}  # per explainer: the focus finding's clean and adversarial maps [B, H, W]
        boxes = batch["boxes"][image_idx, focus]
        for name, explainer in self.explainers.items():
            m_clean = clean_maps[name] if clean_maps and name in clean_maps else explainer.all_findings(classifier, images)
            m_adv = explainer.all_findings(classifier, adv.images)
            focus_maps[name] = (select_maps(m_clean, image_idx, focus), select_maps(m_adv, image_idx, focus))
            columns.update(map_columns(name, *focus_maps[name], boxes, self.top_fraction))
        for side, x, p in (("clean", images, p_clean), ("adv", adv.images, p_adv)):
            columns.update(self.detection.features(classifier, x, p, index, side))
        self.records.update(columns)
        self._keep_examples(batch, adv, p_clean, p_adv, focus, focus_maps)

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
        and what the figures, the transfer analysis and the adaptive study need (the records,
        ROC curves, DetectionData)."""
        records = self.records.compute()
        auroc_mean, per_finding = finding_aurocs(self.auroc_adv.compute(), self.scored)
        self.auroc_adv.reset()
        detection, curves, data = self.detection.score(records)
        results = {
            "attack": attack_results(self.attack, records, self.findings, auroc_mean, per_finding),
            "ce_under_attack": ce_under_attack(records, self.explainers),
            "detection": detection,
        }
        stats = {side: records.statistics(side) for side in ("clean", "adv")}
        return results, {"statistics": stats, "roc": curves, "detection_data": data, "examples": self.examples,
                         "records": records}
