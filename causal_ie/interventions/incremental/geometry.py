"""Where a changed box can be in each map: per axis, for every position of the input box.

All rules are separable in rows and columns, so a node's :class:`Geometry` holds, per axis and
per probe (each possible start of the input box), the changed interval and the patch that is
recomputed for it: one patch size for the whole batch, only its position varies. Region ops also
say which region of their input the patch is computed from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from causal_ie.interventions.incremental.rules import Window


def ceil_div(a: Tensor, b: int) -> Tensor:
    return -((-a) // b)


@dataclass
class Geometry:
    """Where a node's changed values can be, per position of the input box (one entry per probe),
    for rows (axis 0) and columns (axis 1)."""

    size: tuple[int, int]  # the patch recomputed for every box (the same for all)
    start: tuple[Tensor, Tensor]  # patch start per probe
    lo: tuple[Tensor, Tensor]  # changed interval [lo, hi) per probe (lo >= start, hi <= start + size)
    hi: tuple[Tensor, Tensor]
    map_size: tuple[int, int]
    region_start: tuple[Tensor, Tensor] | None = None  # window ops: input region read, per probe
    region_len: tuple[int, int] | None = None

    @property
    def fraction(self) -> float:
        return self.size[0] * self.size[1] / (self.map_size[0] * self.map_size[1])


@dataclass(frozen=True)
class ResampleAxis:
    """One axis of a resampling: output i is ``weights[i] @ input``, whose non-zero weights lie in
    input rows ``first[i]..last[i]`` (both non-decreasing in i for every mode of ``F.interpolate``)."""

    weights: Tensor  # [n_out, n_in]
    first: Tensor  # [n_out] long, on the CPU
    last: Tensor

    @classmethod
    def of(cls, weights: Tensor) -> ResampleAxis:
        nonzero = (weights != 0).cpu()
        index = torch.arange(weights.shape[1])
        first = torch.where(nonzero, index, weights.shape[1]).amin(1)
        last = torch.where(nonzero, index, -1).amax(1)
        return cls(weights, first, last)

    @property
    def taps(self) -> int:
        return int((self.last - self.first).max()) + 1

    @property
    def monotone(self) -> bool:
        return bool((self.last >= self.first).all() and (self.first.diff() >= 0).all() and (self.last.diff() >= 0).all())


def resample_geometry(axes: tuple[ResampleAxis, ...], arg: Geometry, out_size: tuple[int, int]) -> Geometry | str:
    """A changed interval [lo, hi) of the input changes the outputs whose weights reach into it; their
    patch is recomputed from the input rows all its outputs read (inside the map: no padding)."""
    sizes, starts, los, his, rstarts, rlens = [], [], [], [], [], []
    for axis, resampled in enumerate(axes):
        n_in, n_out = arg.map_size[axis], out_size[axis]
        if resampled.weights.shape != (n_out, n_in):
            return f"resampling weights {tuple(resampled.weights.shape)} do not map {n_in} to {n_out}"
        if not resampled.monotone:
            return "resampling weights are not banded"
        first, last = resampled.first, resampled.last
        lo = torch.searchsorted(last, arg.lo[axis]).clamp(max=n_out - 1)  # the first output reading row lo
        hi = torch.searchsorted(first, arg.hi[axis]).clamp(max=n_out)  # past the last reading row hi - 1
        hi = torch.maximum(hi, lo + 1)
        size = int((hi - lo).max())
        start = lo.clamp(max=n_out - size)
        rstart = first[start]
        rlen = int((last[start + size - 1] + 1 - rstart).max())
        rstart = rstart.clamp(max=n_in - rlen)
        sizes.append(size), starts.append(start), los.append(lo), his.append(hi)
        rstarts.append(rstart), rlens.append(rlen)
    return Geometry(tuple(sizes), tuple(starts), tuple(los), tuple(his), out_size, tuple(rstarts), tuple(rlens))


def window_geometry(window: Window, arg: Geometry, out_size: tuple[int, int]) -> Geometry | str:
    """The outputs of a sliding window op a changed interval reaches, and the input region (with
    the op's padding) their patch is computed from; or why the output size does not follow."""
    sizes, starts, los, his, rstarts, rlens = [], [], [], [], [], []
    for axis in (0, 1):
        n_in, n_out = arg.map_size[axis], out_size[axis]
        k, s, d = window.kernel[axis], window.stride[axis], window.dilation[axis]
        pb, pe = window.pads(n_in, axis)
        e = d * (k - 1)
        floor_out = (n_in + pb + pe - e - 1) // s + 1
        if not (n_out == floor_out or (window.ceil_mode and n_out == floor_out + 1)):
            return f"output size {n_out} does not follow from the window geometry"
        lo = ceil_div(arg.lo[axis] + pb - e, s).clamp(min=0, max=n_out - 1)
        hi = ((arg.hi[axis] - 1 + pb) // s + 1).clamp(max=n_out)
        hi = torch.maximum(hi, lo + 1)
        size = int((hi - lo).max())
        start = lo.clamp(max=n_out - size)
        rstart = start * s - pb
        rlen = (size - 1) * s + e + 1
        if not window.overhang_ok and int(rstart.max()) + rlen > n_in + pe:
            return "windows reach past the padding (ceil_mode)"
        sizes.append(size), starts.append(start), los.append(lo), his.append(hi)
        rstarts.append(rstart), rlens.append(rlen)
    return Geometry(tuple(sizes), tuple(starts), tuple(los), tuple(his), out_size, tuple(rstarts), tuple(rlens))
