"""Baselines b of an intervention do(X_R = b): what a removed region is replaced by.

A :class:`Baseline` is either one number (the fast path: regions are filled with
a scalar) or a bank of baseline images of shape ``[N, S, C, H, W]``: for every
input image ``n`` one or more samples ``s`` (``S > 1`` only for random
baselines, whose causal effect is the mean over the samples). Banks may be
broadcast views (``expand``): they are only ever read at the pixels a region
covers, so a per-image mean or a constant image never has to be materialised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur

BASELINES = ("zero", "constant", "mean", "blur", "noise")


@dataclass(frozen=True)
class Baseline:
    """What an intervened region is set to: ``value`` (a scalar) or ``images`` [N, S, C, H, W]."""

    value: float | None = None
    images: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.value is None) == (self.images is None):
            raise ValueError("a Baseline is either a scalar value or a bank of images, not both")
        if self.images is not None and self.images.dim() < 3:
            raise ValueError(f"baseline images must be [N, S, C, ...], got shape {tuple(self.images.shape)}")

    @property
    def samples(self) -> int:
        """How many baseline samples each image is intervened with (the S of E_b)."""
        return 1 if self.images is None else int(self.images.shape[1])

    def at(self, image_idx: Tensor, sample_idx: Tensor, flat_idx: Tensor) -> Tensor:
        """Baseline values [B, C, P] of images ``image_idx`` [B], samples ``sample_idx`` [B]
        at flat spatial positions ``flat_idx`` [B, P] (row * W + col)."""
        assert self.images is not None
        bank = self.images
        width = bank.shape[-1]
        rows, cols = flat_idx // width, flat_idx % width
        channels = torch.arange(bank.shape[2], device=bank.device)
        # Advanced indices separated only by the channel index broadcast to [B, C, P].
        return bank[
            image_idx[:, None, None],
            sample_idx[:, None, None],
            channels[None, :, None],
            rows[:, None, :],
            cols[:, None, :],
        ]

    def full(self, image_idx: Tensor, sample_idx: Tensor) -> Tensor:
        """Whole baseline images [B, C, ...] for images ``image_idx``, samples ``sample_idx``."""
        assert self.images is not None
        return self.images[image_idx, sample_idx]


def blur_kernel_size(size: int) -> int:
    """Odd Gaussian kernel of about a quarter of the image side (at least 3): 57 px at 224 px.

    The blur has to wipe out lesion-scale detail (a few % of the image) while
    keeping the overall intensity and coarse anatomy (RISE, Petsiuk et al. 2018,
    use it for deletion curves), so it scales with the image, not in pixels.
    """
    return max(3, (size // 4) | 1)


def blur_sigma(kernel_size: int) -> float:
    """Sigma for ``kernel_size``: kernel / 4, so the Gaussian is not cut off much by the kernel's ends."""
    return kernel_size / 4.0


def blur(x: Tensor) -> Tensor:
    """Gaussian blur of images [N, C, H, W] with :func:`blur_kernel_size` / :func:`blur_sigma`
    per axis (torchvision ``gaussian_blur``, reflect padding). The one blur of the project:
    the ``blur`` baseline of interventions and of deletion/insertion curves."""
    kh, kw = blur_kernel_size(x.shape[-2]), blur_kernel_size(x.shape[-1])
    # reflect padding needs the half kernel to be smaller than the image
    kh, kw = min(kh, _largest_odd_below(x.shape[-2])), min(kw, _largest_odd_below(x.shape[-1]))
    if kh < 3 and kw < 3:
        return x.clone()
    return gaussian_blur(x, kernel_size=[kw, kh], sigma=[blur_sigma(kw), blur_sigma(kh)])


def _largest_odd_below(size: int) -> int:
    return max(1, size - 1 if size % 2 == 0 else size)


def make_baseline(
    x: Tensor,
    baseline: str | float | Tensor,
    *,
    baseline_value: float = 1.0,
    noise_samples: int = 8,
    generator: torch.Generator | None = None,
) -> Baseline:
    """The :class:`Baseline` for images ``x`` [N, C, H, W] named by ``baseline``.

    - ``"zero"``: 0; ``"constant"``: ``baseline_value`` (e.g. a data-set mean);
    - ``"mean"``: each image's own mean intensity per channel (not the data-set
      mean: pass that as ``"constant"``);
    - ``"blur"``: :func:`blur` of the image;
    - ``"noise"``: ``noise_samples`` uniform [0, 1) images per input image, drawn
      as ``torch.rand((noise_samples, *x.shape), generator=generator)`` (on the
      generator's device), so sample ``s`` is ``noise[s]``; the effect is the
      mean over the samples;
    - a float, or a Tensor broadcastable to ``x``: used as is.
    """
    if isinstance(baseline, bool):
        raise ValueError(f"baseline must be one of {BASELINES}, a float or a Tensor, got {baseline!r}")
    if isinstance(baseline, int | float):
        return Baseline(value=float(baseline))
    if isinstance(baseline, Tensor):
        b = baseline.to(device=x.device, dtype=x.dtype)
        try:
            shape = torch.broadcast_shapes(b.shape, x.shape)
        except RuntimeError:
            shape = None
        if shape != x.shape:
            raise ValueError(
                f"baseline tensor of shape {tuple(b.shape)} does not broadcast to the images' "
                f"shape {tuple(x.shape)}"
            )
        return Baseline(images=b.expand(x.shape)[:, None])
    if not isinstance(baseline, str) or baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, a float or a Tensor, got {baseline!r}")
    if baseline == "zero":
        return Baseline(value=0.0)
    if baseline == "constant":
        return Baseline(value=float(baseline_value))
    if baseline == "mean":
        return Baseline(images=x.mean(dim=(-2, -1), keepdim=True).expand(x.shape)[:, None])
    if baseline == "blur":
        return Baseline(images=blur(x)[:, None])
    if int(noise_samples) < 1:
        raise ValueError(f"noise_samples must be >= 1, got {noise_samples}")
    device = generator.device if generator is not None else x.device
    noise = torch.rand((int(noise_samples), *x.shape), generator=generator, device=device, dtype=x.dtype)
    return Baseline(images=noise.to(x.device).transpose(0, 1))
