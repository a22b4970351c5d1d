"""Multi-label chest X-ray classifier (CheXNet recipe) as a LightningModule."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import Metric

from causal_ie.data.findings import NIH14
from causal_ie.labels import LabelSpace
from causal_ie.models.backbone import Normalize, create_backbone
from causal_ie.models.auroc import auroc_targets, label_auroc, per_label

log = logging.getLogger(__name__)

def _factory(value: Any, key: str) -> Callable[..., Any]:
    """A ``_partial_`` factory: as given, or built from its recorded ``_target_`` and arguments."""
    if isinstance(value, Mapping):
        from hydra.utils import instantiate

        return instantiate({**value, "_partial_": True}, _convert_="all")
    if not callable(value):
        raise ValueError(f"{key} must be a _partial_ config (a callable), got {value!r}")
    return value


def described(factory: Callable[..., Any]) -> dict[str, Any]:
    """A ``functools.partial`` (a ``_partial_`` config) as plain values for the checkpoint: its
    ``_target_`` and keyword arguments."""
    func = getattr(factory, "func", factory)
    keywords = getattr(factory, "keywords", {}) or {}
    plain = {k: (list(v) if isinstance(v, tuple) else v) for k, v in keywords.items()}
    return {"_target_": f"{func.__module__}.{func.__qualname__}", **plain}


CHECKPOINT_EXPECTED = (
    "expected a Lightning checkpoint written by train.py (checkpoints/best.ckpt of a train run, "
    "e.g. outputs/train/<time>/checkpoints/best.ckpt)"
)
# the first bytes of a zip archive: torch.save's format since torch 1.6
_ZIP_MAGIC = b"PK\x03\x04"


def read_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> Mapping[str, Any]:
    """``torch.load(path, weights_only=True)`` of a checkpoint mapping; ValueError naming ``path``
    and saying what is wrong (empty, truncated, not a torch file, not a mapping) otherwise."""
    with path.open("rb") as f:
        head = f.read(4)
    if not head:
        raise ValueError(f"checkpoint {str(path)!r} is empty (0 bytes); {CHECKPOINT_EXPECTED}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        text = str(err)
        if "WeightsUnpickler error:" in text:  # the useful line of torch's long weights_only message
            text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
        reason = " ".join(text.split())[:200] or type(err).__name__
        if "Unsupported global" in reason:
            problem = (
                f"holds objects other than tensors and plain Python values, which weights_only=True refuses ({reason})"
            )
        elif head == _ZIP_MAGIC:
            problem = f"is truncated or corrupt: a zip archive torch cannot read ({reason})"
        elif head[:1] == b"\x80" and "magic number" in reason:  # pickle's PROTO opcode, no torch header
            problem = f"is not a torch checkpoint but a plain pickle ({reason})"
        else:
            if reason.startswith("Unsupported operand ") and reason[20:].isdigit() and 32 <= int(reason[20:]) < 127:
                reason += f", the byte {chr(int(reason[20:]))!r}: a text file?"
            problem = f"is not a torch checkpoint (torch.load: {reason})"
        raise ValueError(f"checkpoint {str(path)!r} {problem}; {CHECKPOINT_EXPECTED}") from None
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(ckpt).__name__}, not a checkpoint dict; {CHECKPOINT_EXPECTED}")
    return ckpt


class Classifier(L.LightningModule):
    """A timm backbone behind an input normaliser, trained with BCE-with-logits.

    ``forward`` takes images in [0,1] (shape [N, in_chans, H, W]) and returns one
    logit per finding, so CE, CAMs, attacks and counterfactuals never need to
    know the normalisation. As in CheXNet (Rajpurkar et al. 2017): Adam and
    ReduceLROnPlateau on the validation loss by default; per-finding AUROC on validation.

    Args:
        backbone: timm model name (``densenet121``, ``resnet18``, ...).
        pretrained: load timm hub weights (needs the hub).
        checkpoint: local weights file for the backbone (wins over ``pretrained``).
        labels: the outputs' label space (a :class:`~causal_ie.labels.LabelSpace`, its
            ``as_dict`` or a list of names), in order: train.py passes the data's. Kept in
            the checkpoint. Default: NIH's 14 findings.
        findings: the output names alone, as checkpoints before label spaces stored them
            (ignored when ``labels`` is given).
        image_size: the size the model is trained at; recorded in the
            checkpoint so evaluation can check it fits the data.
        pos_weight: per-finding positive weights for BCE (list), or None.
        channels_last: keep the weights (and so every activation) in the channels_last
            memory format: faster convolutions on GPUs with tensor cores under mixed
            precision; same results up to float rounding. Off by default.
        optimizer: ``parameters -> Optimizer`` (``model.optimizer``, a ``_partial_`` config);
            default Adam with lr 1e-3.
        scheduler: ``optimizer -> scheduler`` stepped on ``val/loss`` each epoch
            (``model.scheduler``; None: none); default (``"plateau"``) ReduceLROnPlateau (factor 0.1,
            patience 1). Both are recorded in the checkpoint as their target and arguments.
        adv_train: adversarial training (Madry et al. 2018): an object with ``settings`` (plain
            values for the checkpoint), ``attack`` (None: standard training),
            ``is_adversarial_batch(i)`` and ``(model, images, labels, findings) -> images``, as
            :class:`causal_ie.attacks.AdversarialTraining` that ``model.adv_train`` builds; or
            None. Validation and test stay clean. A loaded checkpoint records the settings in
            ``hparams.adv_train`` and trains no more (settings given as a mapping, as
            Lightning's ``load_from_checkpoint`` passes them, are recorded the same way).
        lr, weight_decay, betas, lr_factor, lr_patience: the Adam and plateau settings of
            checkpoints written before ``optimizer``/``scheduler`` existed (used when those are
            left at their defaults).
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        pretrained: bool = False,
        checkpoint: str | None = None,
        labels: LabelSpace | Mapping[str, Any] | Sequence[str] | None = None,
        findings: Sequence[str] | None = None,
        in_chans: int = 1,
        image_size: int | None = None,
        mean: float | list[float] = 0.449,
        std: float | list[float] = 0.226,
        drop_rate: float = 0.0,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None | str = "plateau",
        pos_weight: list[float] | None = None,
        adv_train: Any = None,
        channels_last: bool = False,
        lr: float | None = None,
        weight_decay: float | None = None,
        betas: Sequence[float] | None = None,
        lr_factor: float | None = None,
        lr_patience: int | None = None,
    ):
        super().__init__()
        if labels is None:
            labels = NIH14 if findings is None else LabelSpace(tuple(findings), "checkpoint")
        self.labels = LabelSpace.from_value(labels)
        findings = list(self.labels.names)
        if pos_weight is not None and len(pos_weight) != len(findings):
            raise ValueError(
                f"model.pos_weight has {len(pos_weight)} values, expected one per finding ({len(findings)})"
            )
        if isinstance(adv_train, Mapping):  # settings recorded in a checkpoint (load_from_checkpoint)
            recorded_adv = dict(adv_train)
            if recorded_adv.get("attack") is not None:
                log.warning("adv_train given as recorded settings %s: kept in hparams, no adversarial training "
                            "(model.adv_train builds causal_ie.attacks.AdversarialTraining to train)", recorded_adv)
            adv_train = None
        else:
            recorded_adv = None if adv_train is None else dict(adv_train.settings)
        self.adv_train = adv_train if adv_train is not None and adv_train.attack is not None else None
        self.optimizer_factory = _factory(optimizer, "model.optimizer") if optimizer is not None else (
            functools.partial(torch.optim.Adam, lr=1e-3 if lr is None else float(lr),
                              betas=tuple(betas or (0.9, 0.999)), weight_decay=float(weight_decay or 0.0))
        )
        if scheduler == "plateau":  # CheXNet's; lr_factor / lr_patience: checkpoints from before _partial_ configs
            scheduler = functools.partial(
                torch.optim.lr_scheduler.ReduceLROnPlateau, mode="min", factor=0.1 if lr_factor is None else float(lr_factor),
                patience=1 if lr_patience is None else int(lr_patience),
            )
        elif isinstance(scheduler, str):
            raise ValueError(f"model.scheduler={scheduler!r}: expected a _partial_ scheduler config or null")
        self.scheduler_factory = None if scheduler is None else _factory(scheduler, "model.scheduler")
        # Plain Python types only, so checkpoints load with weights_only=True.
        self.save_hyperparameters(
            dict(
                backbone=backbone,
                pretrained=bool(pretrained),
                checkpoint=None if checkpoint is None else str(checkpoint),
                labels=self.labels.as_dict(),
                in_chans=int(in_chans),
                image_size=None if image_size is None else int(image_size),
                mean=mean if isinstance(mean, float | int) else [float(m) for m in mean],
                std=std if isinstance(std, float | int) else [float(s) for s in std],
                drop_rate=float(drop_rate),
                optimizer=described(self.optimizer_factory),
                scheduler=None if self.scheduler_factory is None else described(self.scheduler_factory),
                pos_weight=None if pos_weight is None else [float(w) for w in pos_weight],
                adv_train=recorded_adv,
                channels_last=bool(channels_last),
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
        self.val_auroc = label_auroc(len(findings))
        self.test_auroc = label_auroc(len(findings))
        if channels_last:
            # convolutions follow their weight's layout (cuDNN and oneDNN take channels_last when
            # either the input or the weight has it), so the images need no conversion; moving
            # the model to a device and loading a state dict keep the layout
            self.to(memory_format=torch.channels_last)

    @property
    def num_findings(self) -> int:
        return len(self.findings)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean BCE over the known labels: a NaN label (an uncertain CheXpert label under
        ``data.uncertain=ignore``) adds nothing, neither to the sum nor to the count."""
        known = ~torch.isnan(labels)
        if bool(known.all()):
            return nn.functional.binary_cross_entropy_with_logits(logits, labels, pos_weight=self.pos_weight)
        per_entry = nn.functional.binary_cross_entropy_with_logits(
            logits, labels.nan_to_num(0.0), pos_weight=self.pos_weight, reduction="none"
        )
        return (per_entry * known).sum() / known.sum().clamp(min=1)

    @property
    def adv_attack(self) -> Any:
        """The attack adversarial training runs (None: standard training, or a loaded checkpoint)."""
        return None if self.adv_train is None else self.adv_train.attack

    def is_adversarial_batch(self, batch_idx: int) -> bool:
        """Whether training batch ``batch_idx`` is replaced by its adversarial version (the
        schedule of ``adv_train``; never without one)."""
        return self.adv_train is not None and self.adv_train.is_adversarial_batch(batch_idx)

    def adversarial_images(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``adv_train``'s images against the current weights.

        The attack runs the model in eval mode (no BatchNorm statistics updates, no
        dropout) and gives every submodule its own mode back; it asks autograd for
        input gradients only, so parameters' ``.grad`` stay untouched.
        """
        if self.adv_train is None:
            raise RuntimeError("adversarial_images needs model.adv_train.attack (adversarial training is off)")
        return self.adv_train(self, images, labels, self.findings)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images = batch["image"]
        if self.adv_train is not None:
            adversarial = self.is_adversarial_batch(batch_idx)
            if adversarial:
                images = self.adversarial_images(images, batch["labels"])
            self.log("train/adv_batch", float(adversarial), batch_size=len(images))
        logits = self(images)
        loss = self.loss(logits, batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        return loss

    def _eval_step(self, batch: dict, stage: str, auroc: Metric) -> None:
        logits = self(batch["image"])
        loss = self.loss(logits, batch["labels"])
        # float32 probabilities: under *-mixed a half-precision sigmoid rounds them to ~2e-3 and ties the ranking
        half = logits.dtype in (torch.float16, torch.bfloat16)
        auroc.update((logits.float() if half else logits).sigmoid(), auroc_targets(batch["labels"]))
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(logits))

    def _log_auroc(self, stage: str, auroc: Metric) -> None:
        per_finding = per_label(auroc.compute())
        auroc.reset()
        for name, value in zip(self.findings, per_finding):
            self.log(f"{stage}/auroc/{name}", value)
        # over the findings with an AUROC: one whose split holds one class only is NaN (undefined);
        # NaN only when no finding has both classes (early stopping is told not to stop on it)
        defined = per_finding[~torch.isnan(per_finding)]
        mean = defined.mean() if defined.numel() else torch.tensor(float("nan"))
        self.log(f"{stage}/auroc_mean", mean, prog_bar=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_auroc)

    def on_validation_epoch_end(self) -> None:
        self._log_auroc("val", self.val_auroc)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_auroc)

    def on_test_epoch_end(self) -> None:
        self._log_auroc("test", self.test_auroc)

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return opt
        # a plateau scheduler steps on the validation loss, once per epoch (CheXNet's recipe)
        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "monitor": "val/loss", "interval": "epoch"}}

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "Classifier":
        """Load a trained classifier from a Lightning checkpoint (``weights_only=True``).

        The backbone is rebuilt without downloading anything: the checkpoint
        holds all weights. Anything else (a text file, an empty or truncated
        file, a pickle of something else, a bare state dict) is a ValueError
        naming the file and what was expected, not torch's unpickler message.
        """
        path = Path(path)
        if path.is_dir():
            raise FileNotFoundError(f"checkpoint {str(path)!r} is a directory; {CHECKPOINT_EXPECTED}")
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
        ckpt = read_checkpoint(path, map_location)
        if "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
            found = sorted(str(k) for k in ckpt)
            shown = found if len(found) <= 8 else [*found[:8], f"... ({len(found)} keys)"]
            bare = "a bare state dict" if all(isinstance(v, torch.Tensor) for v in ckpt.values()) else "a mapping"
            raise ValueError(
                f"checkpoint {str(path)!r} is not a causal_ie Classifier checkpoint: {bare} with no 'hyper_parameters' "
                f"or no 'state_dict' (found keys {shown}), so the model settings are unknown; {CHECKPOINT_EXPECTED}"
            )
        hp = dict(ckpt["hyper_parameters"])
        hp.update(pretrained=False, checkpoint=None)
        recorded = hp.pop("adv_train", None)  # how it was trained; a loaded model trains no more
        try:
            model = cls(**hp)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"checkpoint {str(path)!r}: its hyper_parameters do not build a Classifier of this version ({err}); "
                f"{CHECKPOINT_EXPECTED}"
            ) from err
        try:
            model.load_state_dict(ckpt["state_dict"])
        except RuntimeError as err:
            detail = " ".join(str(err).split())
            raise ValueError(
                f"checkpoint {str(path)!r}: the weights do not fit the {hp.get('backbone')!r} classifier its "
                f"hyper_parameters describe ({detail[:400]}); {CHECKPOINT_EXPECTED}"
            ) from None
        model.hparams["adv_train"] = recorded
        return model.eval()
