"""Backbone factory: any timm image model as a 1-channel, 14-output network."""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from torch import nn

log = logging.getLogger(__name__)


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for but could not be obtained."""


def create_backbone(
    name: str,
    *,
    num_classes: int,
    in_chans: int = 1,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    drop_rate: float = 0.0,
) -> nn.Module:
    """Build timm model ``name`` with ``in_chans`` inputs and ``num_classes`` logits.

    Weights: ``checkpoint`` (a local timm/torchvision state-dict file, e.g. the
    ImageNet weights copied onto an offline machine) wins over ``pretrained``
    (download from the timm hub). timm adapts the first convolution to
    ``in_chans`` (summing RGB filters for grayscale) and resets the classifier,
    so an ImageNet file works as is.
    """
    if name not in timm.list_models() and not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:8]
        raise ValueError(
            f"model.backbone={name!r} is not a timm model; similar names: {close}"
        )
    kwargs = dict(num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"model.checkpoint={str(checkpoint)!r}: no such file; expected a state-dict "
                f"(.pth/.bin/.safetensors) of timm model {name!r}"
            )
        log.info("loading %s weights from %s", name, path)
        try:
            return timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs
            )
        except Exception as err:  # a mismatching file fails deep inside timm
            raise PretrainedWeightsError(
                f"model.checkpoint={str(path)!r} could not be loaded into {name!r}: {err}"
            ) from err
    if pretrained:
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as err:  # offline hub: URLError, HF hub errors, ...
            raise PretrainedWeightsError(
                f"could not obtain pretrained weights for {name!r} from the timm hub "
                f"({type(err).__name__}: {err}). Offline? Copy the weights file to this "
                f"machine and set model.checkpoint=/path/to/file, or train from scratch "
                f"with model.pretrained=false."
            ) from err
    return timm.create_model(name, pretrained=False, **kwargs)


class Normalize(nn.Module):
    """(x - mean) / std with per-channel constants; lets every caller feed [0,1] images."""

    def __init__(self, mean: float | list[float], std: float | list[float], channels: int):
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() == 1:
            mean_t = mean_t.expand(channels)
        if std_t.numel() == 1:
            std_t = std_t.expand(channels)
        if mean_t.numel() != channels or std_t.numel() != channels:
            raise ValueError(
                f"model.mean/std need 1 or {channels} values, got {mean_t.numel()} and {std_t.numel()}"
            )
        if (std_t <= 0).any():
            raise ValueError(f"model.std must be positive, got {std_t.tolist()}")
        self.register_buffer("mean", mean_t.clone().view(1, -1, 1, 1))
        self.register_buffer("std", std_t.clone().view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
