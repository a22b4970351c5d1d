"""Numeric precision: where mixed precision may speed a run up, and where it must not.

Lightning's ``trainer.precision`` (``32-true``, ``bf16-mixed``, ``16-mixed``,
``64-true``, ...) sets how a model computes. Under ``*-mixed`` Lightning runs
``training_step`` *and* ``test_step`` inside ``torch.autocast``: convolutions and
matrix products then compute in bfloat16 (8 significant bits) or float16 (11).

That suits *searches* -- training steps, attack iterations, counterfactual
optimisation -- which only need a good direction. It does not suit
*measurements*: a CE map is a difference of two probabilities, often 1e-3 or
less, and in bfloat16 a probability near 0.5 is only known to 2e-3. On the
32 px test model (largest |CE| 4.4e-3), bf16 autocast moves patch CE maps by up
to 3.5e-3 (correlation 0.88 with the float32 maps; 0.75 for latent CE). So
measurements are taken in full precision whatever the trainer's setting
(:func:`full_precision` switches autocast off for a block): CE maps, probabilities,
AUROCs, deletion curves, counterfactual confidences. With ``precision=32-true`` (the
default) nothing changes. Used so far by the deletion/insertion curves, the latent
autoencoder's training, CAMs (pytorch-grad-cam) and the counterfactual command
(confidences, CE maps); ``tests/test_gpu_path.py`` checks the whole evaluation.

float16 (``16-mixed``) has another hazard: without loss scaling, gradients with
respect to the input can underflow to 0 in float16, so a sign-gradient attack
or a Frank-Wolfe step would stall. Searches outside training therefore use
autocast only for bfloat16 (:func:`search_autocast_dtype`), whose exponent range
is float32's.

On Ampere and later GPUs float32 convolutions use TF32 by default
(``torch.backends.cudnn.allow_tf32``), 11 significant bits; set it False for
CE maps that agree with a CPU run to float32 rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["autocast", "current_search_dtype", "full_precision", "parse_precision", "search_autocast_dtype"]

# Lightning's precision names (and their legacy spellings) -> (model dtype, autocast dtype or None)
_PRECISIONS: dict[str, tuple[torch.dtype, torch.dtype | None]] = {
    "32-true": (torch.float32, None),
    "32": (torch.float32, None),
    "64-true": (torch.float64, None),
    "64": (torch.float64, None),
    "bf16-mixed": (torch.float32, torch.bfloat16),
    "bf16": (torch.float32, torch.bfloat16),
    "16-mixed": (torch.float32, torch.float16),
    "16": (torch.float32, torch.float16),
    "bf16-true": (torch.bfloat16, None),
    "16-true": (torch.float16, None),
}


def parse_precision(precision: Any) -> tuple[torch.dtype, torch.dtype | None]:
    """``(model dtype, autocast dtype or None)`` of a Lightning ``trainer.precision`` setting
    (``"bf16-mixed"`` -> float32 weights under bfloat16 autocast; None means ``32-true``).
    ValueError listing the names understood otherwise."""
    key = "32-true" if precision is None else str(precision).strip().lower()
    if key not in _PRECISIONS:
        raise ValueError(f"trainer.precision={precision!r} is not understood; expected one of {', '.join(_PRECISIONS)}")
    return _PRECISIONS[key]


def search_autocast_dtype(precision: Any) -> torch.dtype | None:
    """The autocast dtype a search outside training (attack, counterfactual) may use under
    ``precision``: bfloat16 for ``bf16-mixed``, else None (float32; ``16-mixed`` too, since
    float16 input gradients can underflow without loss scaling)."""
    _, mixed = parse_precision(precision)
    return mixed if mixed == torch.bfloat16 else None


def _device_type(device: torch.device | str) -> str:
    return torch.device(device).type


def current_search_dtype(device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype a search may keep inside the current context on ``device``'s type:
    bfloat16 inside a bfloat16 autocast (Lightning's ``bf16-mixed`` test step), else None
    (no autocast, or float16, whose input gradients can underflow)."""
    kind = _device_type(device)
    if torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.bfloat16:
        return torch.bfloat16
    return None


def autocast(dtype: torch.dtype | None, device: torch.device | str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device``'s type in ``dtype``; a no-op context for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=_device_type(device), dtype=dtype)


@contextlib.contextmanager
def full_precision(device: torch.device | str) -> Iterator[None]:
    """Autocast off on ``device``'s type for the block: a float32 model computes in float32 even
    inside Lightning's ``*-mixed`` steps. Outside autocast this changes nothing."""
    with torch.autocast(device_type=_device_type(device), enabled=False):
        yield
