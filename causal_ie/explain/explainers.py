"""CE explainers behind one call signature, built from the ``mask`` / ``latent`` Hydra configs.

An explainer maps (model, images, pairs of image and finding) to one map per
pair. All findings of an image come from the same interventions, so each
explainer computes every finding once for the distinct images of the pairs and
then selects: asking for five findings of one image costs one run.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from causal_ie.interventions import (
    AutoencoderSettings,
    AutoencoderSpace,
    InterventionSpec,
    autoencoder_space,
    causal_effect,
    latent_effect,
    latent_split,
    superpixel_effect,
)
from causal_ie.precision import full_precision
from causal_ie.interventions.approx import ApproxCheck, ApproxSettings, approximate_causal_effect
from causal_ie.runtime import eval_mode, model_device, model_dtype, to_model


def select_maps(maps: Tensor, img_idx: Tensor, finding_idx: Tensor) -> Tensor:
    """``maps[img_idx[p], finding_idx[p]]`` -> [P, H, W] from maps [B, K, H, W]; a
    single-channel map (outcome ``ece``) serves every finding."""
    channel = finding_idx if maps.shape[1] > 1 else torch.zeros_like(finding_idx)
    return maps[img_idx, channel]


@runtime_checkable
class Explainer(Protocol):
    """``kind`` names the method (``patch``, ``pixel``, ``superpixel``, ``latent``, a CAM, ...)."""

    kind: str

    def __call__(self, model: nn.Module, images: Tensor, img_idx: Tensor, finding_idx: Tensor) -> Tensor:
        """Maps [P, H, W]: the map of finding ``finding_idx[p]`` for image ``images[img_idx[p]]``."""

    def all_findings(self, model: nn.Module, images: Tensor) -> Tensor:
        """Maps [B, K, H, W] of every finding (K = 1 for single-channel outcomes such as ``ece``)."""


class CEExplainer:
    """Shared by the CE explainers: pair selection and device handling.

    Subclasses implement :meth:`_maps` (images on the model's device -> [B, K, H, W]).
    With a single-channel outcome (``ece``) every pair gets that one map.
    """

    kind = "ce"

    def __call__(self, model: nn.Module, images: Tensor, img_idx: Tensor, finding_idx: Tensor) -> Tensor:
        img_idx = torch.as_tensor(img_idx, dtype=torch.long, device=images.device).flatten()
        finding_idx = torch.as_tensor(finding_idx, dtype=torch.long, device=images.device).flatten()
        if img_idx.shape != finding_idx.shape:
            raise ValueError(f"img_idx and finding_idx must pair up, got {img_idx.numel()} and {finding_idx.numel()}")
        if img_idx.numel() == 0:
            return images.new_zeros((0, *images.shape[-2:]))
        distinct, position = torch.unique(img_idx, return_inverse=True)
        maps = self.all_findings(model, images.index_select(0, distinct))
        if maps.shape[1] > 1 and (int(finding_idx.max()) >= maps.shape[1] or int(finding_idx.min()) < 0):
            raise ValueError(f"finding_idx must lie in [0, {maps.shape[1]}), got {finding_idx.tolist()}")
        return select_maps(maps, position, finding_idx)

    def all_findings(self, model: nn.Module, images: Tensor) -> Tensor:
        # a measurement: float32 even inside a bf16/16-mixed test step (causal_ie.precision)
        with full_precision(model_device(model, images.device)):
            return self._maps(model, to_model(model, images)).to(images.device)

    def _maps(self, model: nn.Module, images: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class PatchCE(CEExplainer):
    """Sliding-window CE (``conf/mask/patch.yaml``; ``size=1, stride=1`` is pixel-wise CE).

    ``intervention``: baseline, outcome, batch size, ... (built once from ``conf/intervention``).
    ``approx``: null (exact) or the approximate tier, ``bf16``, ``projective``, ``drilldown`` or a
    ``+``-joined mix (:mod:`causal_ie.interventions.approx`); ``approx_check`` images also get
    the exact map and :attr:`approx_error` reports the difference; ``approx_settings``: ``tau``,
    ``coarse``, ``refine``.
    """

    def __init__(
        self,
        size: int = 8,
        stride: int = 4,
        intervention: InterventionSpec | None = None,
        approx: str | None = None,
        approx_check: int = 8,
        approx_settings: dict[str, Any] | None = None,
    ):
        self.size, self.stride = size, stride
        self.intervention = intervention or InterventionSpec()
        self.kind = "pixel" if size in (1, (1, 1), [1, 1]) else "patch"
        self.approx = ApproxSettings.of(approx, check=approx_check, **(approx_settings or {}))
        self._check = ApproxCheck(self.approx) if self.approx is not None else None

    def _maps(self, model: nn.Module, images: Tensor) -> Tensor:
        window, stride = _int_or_pair(self.size), _int_or_pair(self.stride)

        def exact(x: Tensor) -> Tensor:
            return causal_effect(model, x, window=window, stride=stride, spec=self.intervention)

        if self.approx is None or self._check is None:
            return exact(images)

        def approximate(x: Tensor) -> Tensor:
            return approximate_causal_effect(
                model, x, window=window, stride=stride, approx=self.approx, spec=self.intervention
            )

        def predicted(x: Tensor) -> Tensor:
            with torch.no_grad(), eval_mode(model):
                return model(x).sigmoid() >= 0.5

        pair = (window, window) if isinstance(window, int) else window
        return self._check.run(images, approximate, exact, pair, predicted)

    @property
    def approx_error(self) -> dict[str, Any] | None:
        """The measured error of the approximate tier on the checked images (None when exact)."""
        return None if self._check is None else self._check.summary()


class SuperpixelCE(CEExplainer):
    """CE of SLIC superpixels (``conf/mask/superpixel.yaml``)."""

    kind = "superpixel"

    def __init__(self, n_segments: int = 64, compactness: float = 0.1, intervention: InterventionSpec | None = None):
        self.n_segments, self.compactness = n_segments, compactness
        self.intervention = intervention or InterventionSpec()

    def _maps(self, model: nn.Module, images: Tensor) -> Tensor:
        maps, _ = superpixel_effect(
            model, images, n_segments=self.n_segments, compactness=self.compactness, spec=self.intervention
        )
        return maps


class LatentCE(CEExplainer):
    """CE of interventions on a feature map, as input-size maps (``conf/mask/latent.yaml``;
    see :func:`causal_ie.interventions.latent_effect` with ``as_maps``).

    ``space``: ``activation`` intervenes on the layer's output itself; ``autoencoder`` on
    the bottleneck of an autoencoder trained on it (the paper's code), which must first
    be fitted to the classifier with :meth:`fit_autoencoder` (``evaluate`` does that);
    ``autoencoder`` holds its training settings (see
    :func:`causal_ie.interventions.autoencoder_space`).
    """

    kind = "latent"
    SPACES = ("activation", "autoencoder")

    def __init__(
        self,
        layer: str = "auto",
        mode: str = "spatial",
        space: str = "activation",
        autoencoder: AutoencoderSettings | dict[str, Any] | None = None,
        intervention: InterventionSpec | None = None,
    ):
        if space not in self.SPACES:
            raise ValueError(f"latent.space must be one of {self.SPACES}, got {space!r}")
        self.layer, self.mode = layer, mode
        self.intervention = intervention or InterventionSpec()
        self.space, self.autoencoder = space, AutoencoderSettings.of(autoencoder)
        # the fitted AutoencoderSpace and (weakly) the classifier it was fitted to
        self._space: AutoencoderSpace | None = None
        self._fitted_to: weakref.ref[nn.Module] | None = None

    def fit_autoencoder(
        self, model: nn.Module, batches_factory: Callable[[], Iterable[Tensor]], cache_dir: str | Path, key: str
    ) -> AutoencoderSpace:
        """Train (or load from ``cache_dir``) the autoencoder of ``model`` at ``layer``;
        ``key`` identifies the classifier's weights (checkpoint path, size, mtime)."""
        if self.space != "autoencoder":
            raise ValueError(f"fit_autoencoder needs latent.space='autoencoder', this explainer has {self.space!r}")
        self._space = autoencoder_space(
            model, self.layer, batches_factory, cache_dir=cache_dir, key=key, settings=self.autoencoder,
            progress=self.intervention.progress,
        )
        self._fitted_to = weakref.ref(model)
        return self._space

    def _autoencoder_space(self, model: nn.Module) -> AutoencoderSpace:
        """The fitted space, re-cut and moved if the classifier moved to another device or dtype."""
        if self._space is None or self._fitted_to is None or self._fitted_to() is not model:
            raise RuntimeError(
                "LatentCE(space='autoencoder') has no autoencoder for this classifier: call "
                "fit_autoencoder(model, batches_factory, cache_dir, key) first (evaluate.py fits it)"
            )
        split = latent_split(model, self._space.split.layer)
        if split is not self._space.split:
            moved = self._space.autoencoder.to(device=model_device(model), dtype=model_dtype(model))
            self._space = AutoencoderSpace(split, moved)
        return self._space

    def _maps(self, model: nn.Module, images: Tensor) -> Tensor:
        space = self._autoencoder_space(model) if self.space == "autoencoder" else None
        return latent_effect(
            model, images, layer=self.layer, mode=self.mode, space=space, as_maps=True, spec=self.intervention
        )


def approx_errors(explainers: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{method: approx_error}`` of the explainers that ran approximately and measured it."""
    errors = {}
    for name, explainer in explainers.items():
        error = getattr(explainer, "approx_error", None)
        if error is not None:
            errors[name] = error
    return errors


def _int_or_pair(value: Any) -> int | tuple[int, int]:
    """Hydra hands lists (ListConfig or list) for pairs; the engine wants int or tuple."""
    if isinstance(value, int | bool):
        return value
    return tuple(value)  # type: ignore[return-value]
