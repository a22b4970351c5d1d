"""InterventionSpec: how an intervention do(X_R = b) is made and measured, as one object.

Every CE entry point (sliding windows, masks, superpixels, latent cells and
channels, deletion curves) takes one spec instead of re-spelling its options;
Hydra builds it once (``conf/intervention/``) and the explainers pass it on whole.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from causal_ie.interventions.baselines import BASELINES, Baseline, make_baseline

OUTCOMES = ("prob", "logit", "softmax", "ece")
DEFAULT_BATCH_SIZE = 64
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class EngineSettings:
    """How the engine's forwards run: speed only, the maps stay exact to float32 rounding.

    Built once from ``conf/engine/`` (``python evaluate.py engine.compile=true``) and carried
    whole inside :class:`InterventionSpec` (its ``engine`` field).

    Args:
        channels_last: run convolutions in channels_last (NHWC): the model's 4-D weights are
            converted for the duration of a CE call and restored bit for bit afterwards (on this
            project's 2-core CPU 1.5x faster forwards for resnet18 at 224 px; maps within 1e-6).
        inference_mode: ``torch.inference_mode`` instead of ``no_grad`` around the forwards (not
            with ``differentiable``); results come back as ordinary tensors.
        compile: ``torch.compile`` (inductor) the full forwards that still run: the whole model
            when incremental inference is off or refuses it, the network after the incremental
            cut, the suffix of latent CE. Compiled once per model, shape and setting (cached; the
            first call pays the compilation, minutes on a CPU, and logs it); batches are padded to
            ``batch_size`` so one shape serves a run. If compiling fails the eager forward runs,
            with a warning.
        compile_mode: ``torch.compile``'s mode.
        freeze: inductor freezing (weights folded in as constants, BatchNorm into convolutions; the
            bigger CPU gain); a change of the weights is noticed and recompiles.
    """

    channels_last: bool = True
    inference_mode: bool = True
    compile: bool = False
    compile_mode: str = "default"
    freeze: bool = True

    def __post_init__(self) -> None:
        for name in ("channels_last", "inference_mode", "compile", "freeze"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"engine.{name} must be true or false, got {getattr(self, name)!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"engine.compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")

    @classmethod
    def of(cls, settings: EngineSettings | dict[str, Any] | None) -> EngineSettings:
        """``settings`` as EngineSettings (a dict of its fields, or None for the defaults)."""
        if settings is None:
            return cls()
        if isinstance(settings, cls):
            return settings
        if isinstance(settings, dict):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(settings) - known)
            if unknown:
                raise TypeError(f"unknown engine setting(s) {unknown}; EngineSettings fields: {sorted(known)}")
            return cls(**settings)
        raise ValueError(f"engine must be EngineSettings, a dict or None, got {type(settings).__name__}")


@dataclass(frozen=True, eq=False)
class InterventionSpec:
    """What a region is set to, what the effect is measured on, and how the work is batched.

    Args:
        baseline: ``zero``, ``constant`` (``baseline_value``), ``mean`` (each image's own
            mean), ``blur`` (a Gaussian blur of the image), ``noise`` (``noise_samples``
            uniform draws; the effect is the mean over them), a float, or a Tensor of
            images broadcastable to the inputs (see :func:`~causal_ie.interventions.make_baseline`).
            Latent interventions take ``zero``, ``mean`` (the channel's mean) or a float.
        baseline_value: the value of ``constant``.
        noise_samples: draws of the ``noise`` baseline.
        outcome: ``prob`` (sigmoid), ``logit``, ``softmax`` or ``ece`` (one prediction-weighted
            number per intervention).
        batch_size: perturbed inputs per forward (memory is bounded by it).
        seed: seeds the ``noise`` draws (a fresh generator per call, so calls repeat); None:
            torch's global generator.
        progress: a progress bar over the batches.
        differentiable: keep the autograd graph, so effects can be differentiated with respect
            to the images (an attacker who knows a CE-based detector); memory then grows with
            every perturbed input of the call, so call it on few images and coarse regions.
        incremental: run pixel-space interventions incrementally (exact: only the changed
            region is recomputed through the early layers, from cached clean activations; see
            :mod:`causal_ie.interventions.incremental`); models it cannot follow fall back to
            full forwards, saying why.
        engine: how the forwards run (:class:`EngineSettings`: channels_last, compile, ...; a
            dict of its fields or None for its defaults).
    """

    baseline: str | float | Tensor = "zero"
    baseline_value: float = 1.0
    noise_samples: int = 8
    outcome: str = "prob"
    batch_size: int | None = DEFAULT_BATCH_SIZE
    seed: int | None = None
    progress: bool = False
    differentiable: bool = False
    incremental: bool = True
    engine: EngineSettings | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "engine", EngineSettings.of(self.engine))
        b = self.baseline
        if isinstance(b, bool) or not (isinstance(b, int | float | Tensor) or b in BASELINES):
            raise ValueError(f"intervention baseline must be one of {BASELINES}, a number or a Tensor, got {b!r}")
        if self.outcome not in OUTCOMES:
            raise ValueError(f"intervention outcome must be one of {OUTCOMES}, got {self.outcome!r}")
        if isinstance(self.noise_samples, bool) or int(self.noise_samples) != self.noise_samples or self.noise_samples < 1:
            raise ValueError(f"intervention noise_samples must be an int >= 1, got {self.noise_samples!r}")
        bs = self.batch_size
        if bs is not None and (isinstance(bs, bool) or not isinstance(bs, int) or bs < 1):
            raise ValueError(f"intervention batch_size must be an int >= 1 or null, got {bs!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"intervention seed must be an int or null, got {self.seed!r}")

    @classmethod
    def resolve(cls, spec: InterventionSpec | None = None, **settings: Any) -> InterventionSpec:
        """``spec`` (default: the defaults) with ``settings`` replacing its fields; unknown names
        are an error that lists the fields."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - fields)
        if unknown:
            raise TypeError(f"unknown intervention setting(s) {unknown}; InterventionSpec fields: {sorted(fields)}")
        spec = spec if spec is not None else cls()
        return dataclasses.replace(spec, **settings) if settings else spec

    @property
    def forward_batch(self) -> int:
        """Perturbed inputs per forward (``batch_size``, or the default when null)."""
        return DEFAULT_BATCH_SIZE if self.batch_size is None else self.batch_size

    def generator(self, device: torch.device) -> torch.Generator | None:
        """A fresh generator on ``device`` seeded with ``seed`` (None without a seed)."""
        return None if self.seed is None else torch.Generator(device=device).manual_seed(self.seed)

    def baseline_for(self, x: Tensor) -> Baseline:
        """The :class:`Baseline` of images (or feature maps) ``x`` [N, C, H, W]."""
        return make_baseline(
            x, self.baseline, baseline_value=self.baseline_value, noise_samples=self.noise_samples,
            generator=self.generator(x.device),
        )
