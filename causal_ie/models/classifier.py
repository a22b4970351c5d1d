"""Multi-label chest X-ray classifier (CheXNet recipe) as a LightningModule."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import MultilabelAUROC

from causal_ie.data.findings import FINDINGS
from causal_ie.models.backbone import Normalize, create_backbone


class Classifier(L.LightningModule):
    """A timm backbone behind an input normaliser, trained with BCE-with-logits.

    ``forward`` takes images in [0,1] (shape [N, in_chans, H, W]) and returns one
    logit per finding, so CE, CAMs, attacks and counterfactuals never need to
    know the normalisation. As in CheXNet (Rajpurkar et al. 2017): Adam and
    ReduceLROnPlateau on the validation loss; per-finding AUROC on validation.

    Args:
        backbone: timm model name (``densenet121``, ``resnet18``, ...).
        pretrained: load timm hub weights (needs the hub).
        checkpoint: local weights file for the backbone (wins over ``pretrained``).
        findings: names of the outputs, in order (the data's FINDINGS).
        image_size: the size the model is trained at; recorded in the
            checkpoint so evaluation can check it fits the data.
        pos_weight: per-finding positive weights for BCE (list), or None.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        pretrained: bool = False,
        checkpoint: str | None = None,
        findings: Sequence[str] = FINDINGS,
        in_chans: int = 1,
        image_size: int | None = None,
        mean: float | list[float] = 0.449,
        std: float | list[float] = 0.226,
        drop_rate: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        lr_factor: float = 0.1,
        lr_patience: int = 1,
        pos_weight: list[float] | None = None,
    ):
        super().__init__()
        findings = [str(f) for f in findings]
        if pos_weight is not None and len(pos_weight) != len(findings):
            raise ValueError(
                f"model.pos_weight has {len(pos_weight)} values, expected one per finding ({len(findings)})"
            )
        # Plain Python types only, so checkpoints load with weights_only=True.
        self.save_hyperparameters(
            dict(
                backbone=backbone,
                pretrained=bool(pretrained),
                checkpoint=None if checkpoint is None else str(checkpoint),
                findings=findings,
                in_chans=int(in_chans),
                image_size=None if image_size is None else int(image_size),
                mean=mean if isinstance(mean, float | int) else [float(m) for m in mean],
                std=std if isinstance(std, float | int) else [float(s) for s in std],
                drop_rate=float(drop_rate),
                lr=float(lr),
                weight_decay=float(weight_decay),
                betas=[float(b) for b in betas],
                lr_factor=float(lr_factor),
                lr_patience=int(lr_patience),
                pos_weight=None if pos_weight is None else [float(w) for w in pos_weight],
            )
        )
        self.findings = tuple(findings)
        self.normalize = Normalize(mean, std, in_chans)
        # A checkpoint of ours restores all weights itself: never re-download then.
        self.backbone = create_backbone(
            backbone,
            num_classes=len(findings),
            in_chans=in_chans,
            pretrained=pretrained,
            checkpoint=checkpoint,
            drop_rate=drop_rate,
        )
        self.register_buffer(
            "pos_weight",
            None if pos_weight is None else torch.tensor(pos_weight, dtype=torch.float32),
        )
        self.val_auroc = MultilabelAUROC(num_labels=len(findings), average=None)
        self.test_auroc = MultilabelAUROC(num_labels=len(findings), average=None)

    @property
    def num_findings(self) -> int:
        return len(self.findings)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(
            logits, labels, pos_weight=self.pos_weight
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"])
        loss = self.loss(logits, batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        return loss

    def _eval_step(self, batch: dict, stage: str, auroc: MultilabelAUROC) -> None:
        logits = self(batch["image"])
        loss = self.loss(logits, batch["labels"])
        auroc.update(logits.sigmoid(), batch["labels"].long())
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(logits))

    def _log_auroc(self, stage: str, auroc: MultilabelAUROC) -> None:
        per_finding = auroc.compute()
        auroc.reset()
        for name, value in zip(self.findings, per_finding):
            self.log(f"{stage}/auroc/{name}", value)
        self.log(f"{stage}/auroc_mean", per_finding.mean(), prog_bar=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_auroc)

    def on_validation_epoch_end(self) -> None:
        self._log_auroc("val", self.val_auroc)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_auroc)

    def on_test_epoch_end(self) -> None:
        self._log_auroc("test", self.test_auroc)

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.Adam(
            self.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay
        )
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=hp.lr_factor, patience=hp.lr_patience
        )
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": sched, "monitor": "val/loss", "interval": "epoch"},
        }

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "Classifier":
        """Load a trained classifier from a Lightning checkpoint (``weights_only=True``).

        The backbone is rebuilt without downloading anything: the checkpoint
        holds all weights.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
        if "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
            raise ValueError(
                f"{path}: not a causal_ie Classifier checkpoint (needs 'state_dict' and "
                f"'hyper_parameters'; found keys {sorted(ckpt)})"
            )
        hp = dict(ckpt["hyper_parameters"])
        hp.update(pretrained=False, checkpoint=None)
        model = cls(**hp)
        model.load_state_dict(ckpt["state_dict"])
        return model.eval()
