"""CEEvaluation: CE maps and CAMs on the test split, scored against the lesion boxes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MultilabelAUROC

from causal_ie.attacks.evaluation import AttackEvaluation
from causal_ie.explain.explainers import Explainer, select_maps
from causal_ie.explain.metrics import DEFAULT_THRESHOLDS, DeletionInsertion, localisation_metrics
from causal_ie.interventions import InterventionSpec
from causal_ie.models import Classifier
from causal_ie.models.findings import finding_aurocs, predicted_mask


def box_pairs(
    labels: torch.Tensor, boxes: torch.Tensor, predicted: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image index, finding index) of every present finding that has a box (and that the
    classifier predicts: ``predicted`` [K] bool)."""
    keep = (labels > 0.5) & ~torch.isnan(boxes).any(dim=-1)
    if predicted is not None:
        keep &= predicted.to(keep.device)
    return torch.nonzero(keep, as_tuple=True)


class CEEvaluation(L.LightningModule):
    """Runs in ``Trainer.test``: classification AUROC, and for every finding with a
    box, each explainer's map scored by localisation (pointing game, IoBB/IoU,
    energy pointing game) and faithfulness (deletion/insertion AUC).

    Metrics are torchmetrics, so under DDP each process scores its shard and
    ``compute`` syncs them: the numbers equal a single-process run. After the
    test epoch, ``results`` holds the nested results (keys in
    :mod:`causal_ie.outputs.schema`) and ``artefacts`` what the report sections draw:
    ``localisation.examples``, a few (image, box, maps) per finding, and with an
    attack the attack study's ``attack`` artefacts.
    """

    def __init__(
        self,
        classifier: Classifier,
        explainers: Mapping[str, Explainer],
        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
        deletion_steps: int = 10,
        deletion: InterventionSpec | None = None,
        faithfulness: bool = True,
        examples_per_finding: int = 2,
        attack: AttackEvaluation | None = None,
    ):
        super().__init__()
        if not explainers:
            raise ValueError("CEEvaluation needs at least one explainer (mask= and/or cams=)")
        self.classifier = classifier.eval()
        for p in self.classifier.parameters():
            p.requires_grad_(False)
        self.findings = tuple(classifier.findings)
        self.predicted = predicted_mask(classifier)  # findings a pretrained model lacks are not scored
        self.explainers = dict(explainers)
        self.thresholds = tuple(thresholds)
        self.auroc = MultilabelAUROC(num_labels=len(self.findings), average=None)
        self.localisation = nn.ModuleDict(
            {name: localisation_metrics(self.thresholds) for name in self.explainers}
        )
        self.faithfulness = nn.ModuleDict(
            {
                name: DeletionInsertion(self.classifier, n_steps=deletion_steps, intervention=deletion)
                for name in self.explainers
            }
            if faithfulness
            else {}
        )
        self.examples_per_finding = examples_per_finding
        self.attack = attack
        self.examples: list[dict[str, Any]] = []
        self.results: dict[str, Any] = {}
        self.artefacts: dict[str, dict[str, Any]] = {}
        self._pairs_seen = torch.zeros((), dtype=torch.long)
        self._images_seen = torch.zeros((), dtype=torch.long)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)

    def on_test_epoch_start(self) -> None:
        self.examples = []
        self._pairs_seen = torch.zeros((), dtype=torch.long, device=self.device)
        self._images_seen = torch.zeros((), dtype=torch.long, device=self.device)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        images, labels, boxes = batch["image"], batch["labels"], batch["boxes"]
        with torch.no_grad():
            probs = self.classifier(images).sigmoid()
        self.auroc.update(probs.nan_to_num(0.0), labels.long())
        self._images_seen += images.shape[0]
        img_idx, finding_idx = box_pairs(labels, boxes, self.predicted)
        # the attack study needs every finding's clean CE map; the box pairs are a selection of them
        clean_maps = {}
        if self.attack is not None:
            clean_maps = {n: self.explainers[n].all_findings(self.classifier, images) for n in self.attack.explainers}
            self.attack.update(self.classifier, batch, clean_maps, clean_probs=probs)
        if img_idx.numel() == 0:
            return
        self._pairs_seen += img_idx.numel()
        pair_boxes = boxes[img_idx, finding_idx]
        maps = {}
        for name, explainer in self.explainers.items():
            if name in clean_maps:
                maps[name] = select_maps(clean_maps[name], img_idx, finding_idx).detach()
            else:
                maps[name] = explainer(self.classifier, images, img_idx, finding_idx).detach()
            self.localisation[name].update(maps[name], pair_boxes)
            if name in self.faithfulness:
                self.faithfulness[name].update(images[img_idx], maps[name], finding_idx)
        self._keep_examples(batch, probs, img_idx, finding_idx, maps)

    def _keep_examples(self, batch, probs, img_idx, finding_idx, maps) -> None:
        if not self.trainer.is_global_zero:
            return
        counts: dict[str, int] = {}
        for ex in self.examples:
            counts[ex["finding"]] = counts.get(ex["finding"], 0) + 1
        for p, (i, k) in enumerate(zip(img_idx.tolist(), finding_idx.tolist())):
            name = self.findings[k]
            if counts.get(name, 0) >= self.examples_per_finding:
                continue
            counts[name] = counts.get(name, 0) + 1
            self.examples.append(
                {
                    "id": batch["id"][i],
                    "finding": name,
                    "prob": float(probs[i, k]),
                    "image": batch["image"][i, 0].float().cpu().numpy(),
                    "box": batch["boxes"][i, k].cpu().tolist(),
                    "maps": {m: v[p].float().cpu().numpy() for m, v in maps.items()},
                }
            )

    def on_test_epoch_end(self) -> None:
        auroc_mean, per_finding = finding_aurocs(self.auroc.compute(), self.predicted)
        self.auroc.reset()
        results: dict[str, Any] = {
            "classification": {
                "auroc_mean": auroc_mean,
                "auroc": dict(zip(self.findings, per_finding)),
            },
            "localisation": {},
            "faithfulness": {},
        }
        counts = torch.stack([self._pairs_seen, self._images_seen])
        if self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        results["localisation_pairs"] = int(counts[0])
        results["classification"]["num_images"] = int(counts[1])
        for name in self.explainers:
            loc = self.localisation[name]
            results["localisation"][name] = {k: float(v) for k, v in loc.compute().items()}
            loc.reset()
            if name in self.faithfulness:
                faith = self.faithfulness[name]
                results["faithfulness"][name] = {k: float(v) for k, v in faith.compute().items()}
                faith.reset()
        self.artefacts = {"localisation": {"examples": self.examples}}
        if self.attack is not None:
            attack_results, self.artefacts["attack"] = self.attack.compute()
            results.update(attack_results)
        self.results = results
        ce = results["localisation"].get("ce", {})
        if "pointing_game" in ce:
            self.log("test/ce_pointing_game", ce["pointing_game"], rank_zero_only=True)
        self.log("test/auroc_mean", results["classification"]["auroc_mean"], rank_zero_only=True)
        if self.attack is not None:
            self.log("test/attack_success_rate", results["attack"]["success_rate"], rank_zero_only=True)
            self.log("test/detection_ce_auroc", results["detection"]["ce"]["auroc"], rank_zero_only=True)
