"""How a model is run: its device and dtype, and its train/eval mode for a while.

Every part that runs a classifier (CE, CAMs, attacks, counterfactuals,
detectors) uses these, so a model on a GPU or in float64 gets matching inputs
everywhere and a caller's training flags always come back as they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn


def model_device(model: nn.Module, fallback: torch.device | str = "cpu") -> torch.device:
    """The device of the model's first parameter or buffer (``fallback`` for a stateless model)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device(fallback)


def model_dtype(model: nn.Module, fallback: torch.dtype = torch.float32) -> torch.dtype:
    """The floating dtype of the model's first floating parameter (``fallback`` if none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), fallback)


def to_model(model: nn.Module, x: Tensor) -> Tensor:
    """``x`` on the model's device and in its floating dtype (a float64 or half model gets
    matching inputs)."""
    return x.to(device=model_device(model, x.device), dtype=model_dtype(model, x.dtype))


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Evaluation mode (BatchNorm running stats, no dropout) for the duration; restores each
    module's own training flag afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training
