"""The CE engine: effects of batches of interventions on all findings at once.

An intervention do(X_R = b) replaces region R of an input by a baseline b; its
causal effect on finding k is ``CE_k(R) = y_k(x) - E_b[y_k(x')]``. Every region
kind (sliding windows, superpixels, arbitrary masks, latent cells or channels)
implements the small :class:`Regions` protocol, and :func:`region_effects` runs
them all the same way:

- the work is the flat list of the N unperturbed inputs followed by all
  (image, baseline sample, region) triples, cut into near-equal batches of at
  most ``batch_size`` inputs that freely mix images; the triple of each batch
  entry is computed from its position, so nothing of size "all interventions"
  is ever allocated;
- each batch is gathered from the inputs, intervened on by the region kind
  (in place, no full float masks for windows), and forwarded once: all K
  findings come from the same forward;
- effects land in an [N, S, R, K] table (no accumulation, so deterministic)
  averaged over the S baseline samples.

:func:`causal_effect` (sliding windows) and :func:`mask_effect` (any binary
masks) are the pixel-space entry points; ``superpixel`` and ``latent`` build
their own regions on the same engine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from causal_ie.interventions.baselines import Baseline
from causal_ie.interventions.fast import compiled, engine_session, release
from causal_ie.interventions.incremental import IncrementalForward
from causal_ie.interventions.spec import InterventionSpec
from causal_ie.interventions.windows import WindowGrid
from causal_ie.runtime import eval_mode, to_model
# images may stray this far out of [0, 1] (resampling overshoot) before we call them unnormalised
_RANGE_SLACK = 1e-2

# forward(perturbed inputs [B, ...], image index of each [B]) -> logits [B, K]
BatchForward = Callable[[Tensor, Tensor], Tensor]


class Regions(Protocol):
    """A family of regions to intervene on, one list per image."""

    def region_counts(self, n_images: int) -> list[int]:
        """How many regions each of the ``n_images`` inputs has."""

    def apply(
        self, inputs: Tensor, image_idx: Tensor, region_idx: Tensor, sample_idx: Tensor, baseline: Baseline
    ) -> Tensor:
        """Intervene on ``inputs[b]`` (a private copy of input ``image_idx[b]``, may be changed in
        place): set region ``region_idx[b]`` to baseline sample ``sample_idx[b]``; return the batch."""

    def assemble(self, effects: Tensor) -> Tensor:
        """Turn effects [N, K, R_max] into the result (e.g. maps [N, K, H, W])."""


# ---------------------------------------------------------------- outcomes


def outcome_values(outcome: str, logits: Tensor) -> Tensor:
    """The quantity interventions are measured on: y = sigmoid(z), z, or softmax(z)
    (``ece`` works on softmax(z) too)."""
    if outcome == "prob":
        return logits.sigmoid()
    if outcome == "logit":
        return logits
    return logits.softmax(dim=-1)


def outcome_effect(outcome: str, reference: Tensor, perturbed: Tensor) -> Tensor:
    """Effects [B, K] (``ece``: [B, 1]) from :func:`outcome_values` of the originals and the
    intervened inputs.

    CE_k = y_k(x) - y_k(x'). ECE = sum_k P_k (Q_k - P_k) with P, Q the softmax of
    the original and intervened logits: the expected change of the probability of
    the class drawn from P, negative when the intervention removes evidence.
    """
    if outcome == "ece":
        return (reference * (perturbed - reference)).sum(dim=-1, keepdim=True)
    return reference - perturbed


def outcome_channels(outcome: str, n_findings: int) -> int:
    return 1 if outcome == "ece" else n_findings


# ---------------------------------------------------------------- checks and model handling


def check_images(x: Tensor, name: str = "x") -> None:
    """Inputs must be float images [N, C, H, W] in [0, 1] (the Classifier normalises itself)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of images [N, C, H, W], got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be a 4-D batch of images [N, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a float tensor with values in [0, 1], got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    lo, hi = torch.aminmax(x)
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise ValueError(f"{name} contains NaN or inf")
    if float(lo) < -_RANGE_SLACK or float(hi) > 1 + _RANGE_SLACK:
        raise ValueError(
            f"{name} must hold images in [0, 1] (the model normalises them itself), "
            f"got values in [{float(lo):.3g}, {float(hi):.3g}]"
        )


def image_forward(model: nn.Module) -> BatchForward:
    """The model as a :data:`BatchForward` on whole images."""
    return lambda images, image_idx: model(images)


def batch_forward(
    model: nn.Module, inputs: Tensor, spec: InterventionSpec, *, incremental: type = IncrementalForward, **options: Any
) -> BatchForward:
    """The forward of a pixel-space CE call on the clean images ``inputs``, as ``spec`` says:
    incremental (``spec.incremental``, not with ``differentiable``; ``incremental`` is the class,
    ``options`` go to it) or full forwards; with ``spec.engine.compile`` the full forwards that
    remain (a model the incremental engine refuses, the network after its cut) run compiled.
    Call inside :func:`~causal_ie.interventions.fast.engine_session`."""
    settings = spec.engine
    plain: Callable[[Tensor], Tensor] = model
    if settings.compile and not spec.differentiable:
        batch = spec.forward_batch
        plain = compiled(model, settings, batch=batch, what=type(model).__name__)

        def suffix_compiler(module: nn.Module, batched: tuple[bool, ...]) -> Callable[..., Tensor]:
            key = ("after the incremental cut", tuple(n.name for n in module.graph.nodes))
            what = f"{type(model).__name__} after the incremental cut"
            return compiled(module, settings, batch=batch, batched=batched, key=key, owner=model, what=what)

        options.setdefault("suffix_compiler", suffix_compiler)
    if spec.incremental and not spec.differentiable:
        fwd = incremental(model, inputs, plain_forward=plain, **options)
        return lambda batch, image_idx: fwd(batch, image_idx)
    return lambda images, image_idx: plain(images)


# ---------------------------------------------------------------- the engine


def even_batches(total: int, batch_size: int) -> list[tuple[int, int]]:
    """``ceil(total / batch_size)`` ranges of near-equal size: no small last batch."""
    n_batches = max(1, -(-total // batch_size))
    bounds = [(i * total) // n_batches for i in range(n_batches + 1)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def region_effects(
    forward: BatchForward,
    inputs: Tensor,
    regions: Regions,
    baseline: Baseline,
    spec: InterventionSpec,
    *,
    with_reference: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Effects [N, K, R_max] of intervening on each region of each input (0 past an image's count),
    measured on ``spec.outcome`` in batches of ``spec.batch_size``; with ``with_reference`` also
    the outcome values of the unperturbed inputs [N, K] (the effects are differences from them).

    ``forward`` maps a batch of (intervened) inputs and the index of the input
    each came from to logits. The N unperturbed inputs are the first N items of
    the work list, so their forwards fill the first batch instead of costing a
    small batch of their own. Call inside ``torch.no_grad()`` with the model in
    eval mode (the public entry points do).
    """
    outcome, batch_size, progress = spec.outcome, spec.forward_batch, spec.progress
    n_images, device = inputs.shape[0], inputs.device
    counts = torch.tensor(regions.region_counts(n_images), dtype=torch.long, device=device)
    samples = baseline.samples
    per_image = counts * samples
    ends = per_image.cumsum(0)
    starts = ends - per_image
    interventions = int(ends[-1]) if n_images else 0
    r_max = int(counts.max()) if n_images else 0
    reference_y: Tensor | None = None  # outcome values of the unperturbed inputs, [N, K]
    table: Tensor | None = None  # effects [N, S, R_max, K']

    for a, b in tqdm(even_batches(n_images + interventions, batch_size), disable=not progress, desc="interventions"):
        n_reference = max(0, min(b, n_images) - a)  # unperturbed items at the front of this batch
        reference_idx = torch.arange(a, a + n_reference, device=device)
        item = torch.arange(a + n_reference, b, device=device) - n_images
        image_idx = torch.searchsorted(ends, item, right=True)
        local = item - starts[image_idx]
        sample_idx = local // counts[image_idx]
        region_idx = local % counts[image_idx]
        parts = [inputs.index_select(0, reference_idx)] if n_reference else []
        if item.numel():
            parts.append(regions.apply(inputs.index_select(0, image_idx), image_idx, region_idx, sample_idx, baseline))
        batch = torch.cat(parts) if len(parts) > 1 else parts[0]
        y = outcome_values(outcome, forward(batch, torch.cat([reference_idx, image_idx])))
        if reference_y is None:
            reference_y = torch.empty(n_images, y.shape[-1], dtype=y.dtype, device=device)
            n_out = outcome_channels(outcome, y.shape[-1])
            table = torch.zeros(n_images, samples, r_max, n_out, dtype=y.dtype, device=device)
        reference_y[reference_idx] = y[:n_reference]
        if item.numel():
            effects = outcome_effect(outcome, reference_y.index_select(0, image_idx), y[n_reference:])
            table[image_idx, sample_idx, region_idx] = effects  # type: ignore[index]
    if table is None or reference_y is None:
        raise ValueError("no inputs to intervene on")
    effects = table.mean(dim=1).transpose(1, 2)
    return (effects, reference_y) if with_reference else effects


# ---------------------------------------------------------------- pixel-space entry points


class MaskRegions:
    """Arbitrary binary masks [N or 1, R, H, W] as regions; they may overlap.

    The general (slower) case: applying region r uses ``torch.where`` on a whole
    mask, and the map of a pixel is the mean effect of the masks containing it
    (0 where none does) -- the same rule as for sliding windows.
    """

    def __init__(self, masks: Tensor, n_images: int):
        if masks.dim() != 4 or masks.shape[0] not in (1, n_images):
            raise ValueError(f"masks must be [N or 1, R, H, W] booleans, got shape {tuple(masks.shape)}")
        self.masks = masks.bool()
        self.shared = masks.shape[0] == 1

    def region_counts(self, n_images: int) -> list[int]:
        return [self.masks.shape[1]] * n_images

    def apply(
        self, inputs: Tensor, image_idx: Tensor, region_idx: Tensor, sample_idx: Tensor, baseline: Baseline
    ) -> Tensor:
        owner = torch.zeros_like(image_idx) if self.shared else image_idx
        mask = self.masks[owner, region_idx][:, None]
        if baseline.value is not None:
            return inputs.masked_fill_(mask, baseline.value)
        return torch.where(mask, baseline.full(image_idx, sample_idx).to(inputs.dtype), inputs)

    def assemble(self, effects: Tensor) -> Tensor:
        weights = self.masks.to(effects.dtype)
        sums = torch.einsum("nkr,nrhw->nkhw", effects, weights.expand(effects.shape[0], *weights.shape[1:]))
        coverage = weights.sum(dim=1, keepdim=True)
        return torch.where(coverage > 0, sums / coverage.clamp(min=1), torch.zeros((), dtype=sums.dtype))


def pixel_space_effects(
    model: nn.Module,
    x: Tensor,
    regions_for: Callable[[Tensor], Regions],
    spec: InterventionSpec,
    forward_for: Callable[[nn.Module, Tensor, InterventionSpec], BatchForward] = batch_forward,
    effects_for: Callable[[BatchForward, Tensor, Any, Baseline, InterventionSpec], Tensor] | None = None,
) -> tuple[Tensor, Regions]:
    """What every pixel-space region kind shares: checks, the model's device, eval mode, the
    engine session (``spec.engine``: channels_last weights, inference mode; autograd only with
    ``spec.differentiable``), the baseline, the forward (:func:`batch_forward`: incremental unless
    ``spec.incremental`` is off, compiled with ``spec.engine.compile``; ``forward_for`` replaces it),
    the engine (:func:`region_effects`; ``effects_for`` replaces it, same arguments). Returns effects [N, K, R_max] on the model's device and the regions
    ``regions_for(images on that device)`` built."""
    check_images(x.detach())
    inputs = to_model(model, x)
    regions = regions_for(inputs.detach())
    with eval_mode(model), engine_session(model, spec.engine, spec.differentiable):
        forward = forward_for(model, inputs, spec)
        effects = (effects_for or region_effects)(forward, inputs, regions, spec.baseline_for(inputs), spec)
    return release(effects), regions


def causal_effect(
    model: nn.Module,
    x: Tensor,
    *,
    window: int | tuple[int, int],
    stride: int | tuple[int, int],
    spec: InterventionSpec | None = None,
    **settings: Any,
) -> Tensor:
    """CE maps [N, K, H, W] of sliding-window interventions on images ``x`` [N, C, H, W] in [0, 1].

    Each window (all channels) is set to the baseline; a pixel's value for
    finding k is the mean CE_k of the windows covering it (0 if none). This is
    Captum's ``Occlusion`` with ``sliding_window_shapes=(C, *window)``,
    ``strides=(C, *stride)`` on a forward returning y_k, for all K findings from
    one set of forwards (window placement: :mod:`causal_ie.interventions.windows`).

    Args:
        window, stride: int (square) or (h, w).
        spec: the baseline, outcome, batch size, ... (:class:`InterventionSpec`; default: its
            defaults, a zero baseline on probabilities).
        **settings: fields of the spec to replace, e.g. ``baseline="blur", outcome="logit",
            batch_size=128`` (unknown names are an error).
    """
    spec = InterventionSpec.resolve(spec, **settings)
    effects, grid = pixel_space_effects(
        model, x, lambda inputs: WindowGrid.create(tuple(inputs.shape[-2:]), window, stride), spec
    )
    return grid.assemble(effects).to(x.device)


def mask_effect(
    model: nn.Module,
    x: Tensor,
    masks: Tensor,
    *,
    as_maps: bool = True,
    spec: InterventionSpec | None = None,
    **settings: Any,
) -> Tensor:
    """CE of arbitrary binary region masks [N or 1, R, H, W] on images ``x`` [N, C, H, W].

    Returns maps [N, K, H, W] (mean effect of the masks covering each pixel), or
    with ``as_maps=False`` the effects per mask [N, K, R]. ``spec`` and ``settings``
    as in :func:`causal_effect`.
    """
    if not isinstance(masks, Tensor) or masks.dim() != 4 or masks.shape[-2:] != x.shape[-2:]:
        raise ValueError(
            f"masks must be booleans [N or 1, R, H, W] of the images' size {tuple(x.shape[-2:])}, "
            f"got {tuple(getattr(masks, 'shape', ()))}"
        )
    spec = InterventionSpec.resolve(spec, **settings)
    effects, regions = pixel_space_effects(
        model, x, lambda inputs: MaskRegions(masks.to(inputs.device), inputs.shape[0]), spec
    )
    return (regions.assemble(effects) if as_maps else effects).to(x.device)
