"""The approximate tier of sliding-window CE (issue #15): opt-in, with its error measured.

Exact CE (:func:`~causal_ie.interventions.causal_effect`, incremental by default)
is the reference. ``mask.approx=`` trades exactness for speed with any mix of:

- ``bf16``: the forwards under bfloat16 autocast (convolutions and matrix products
  in bfloat16; logits come back as float32);
- ``projective``: projective-field thresholding (Krypton, Nakandala et al. SIGMOD
  2019). The box a window changes grows through every convolution and pooling by
  the op's context; its border changes little. Each map's recomputed patch is
  truncated to at most ``tau`` of the map's side, centred on the change; values
  outside it are taken as unchanged (the cached clean activation). The incremental
  engine then follows the change further before its cut. ``tau=1`` is exact.
- ``drilldown``: adaptive drill-down (Krypton's second approximation). Stage 1
  computes every ``coarse``-th window per axis (the last row and column too); the
  other windows' effects are estimated by bilinear interpolation over the window
  grid; stage 2 recomputes exactly the ``refine`` share of all windows whose
  estimate is highest: the windows around each finding's best coarse window, the
  findings in turn, then around the second best, ...; stage 3 (up to ``rounds``
  times) computes the still-estimated windows under each map's maximum, so the
  maxima rest on exact windows. Elsewhere the map is the interpolated coarse one.

Because an approximate map is only worth its error, :class:`ApproxCheck` computes
the exact map of the first ``check`` images too and reports, per (image, finding)
map, the largest absolute difference relative to the exact map's largest
absolute value, and pointing-game agreement: the share of maps whose maximum lies
where the exact map's does (on a maximal pixel of the exact map; and, looser,
within one window of it), over all maps and over the maps of findings the model
predicts (probability >= 0.5; the maps of absent findings are mostly noise, whose
maximum moves with any error). ``evaluate.py`` writes it to ``run.<method>.approx_error``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from causal_ie.interventions.baselines import Baseline
from causal_ie.interventions.engine import BatchForward, batch_forward, pixel_space_effects, region_effects
from causal_ie.interventions.incremental import Geometry, IncrementalForward, Window, window_geometry
from causal_ie.interventions.spec import InterventionSpec
from causal_ie.interventions.windows import WindowGrid

METHODS = ("bf16", "projective", "drilldown")


@dataclass(frozen=True)
class ApproxSettings:
    """Which approximations run and how hard they cut (see the module docstring).

    Args:
        methods: a subset of ``bf16``, ``projective``, ``drilldown`` (``"drilldown+projective"`` as a string).
        tau: projective-field threshold: a recomputed patch covers at most this share of its map's
            side (Krypton's tau; 1.0 is exact).
        coarse: drill-down stage 1 computes every ``coarse``-th window along each axis.
        refine: drill-down stage 2 recomputes this share of all windows exactly.
        rounds: drill-down stage 3: up to this many rounds computing the estimated windows under each
            map's maximum (0: none).
        check: the first this many images also get the exact map, to measure the error (0: none).
    """

    methods: tuple[str, ...]
    tau: float = 0.5
    coarse: int = 2
    refine: float = 0.3
    rounds: int = 3
    check: int = 8

    def __post_init__(self) -> None:
        methods = self.methods
        if isinstance(methods, str):
            methods = tuple(m.strip() for m in methods.split("+") if m.strip())
        methods = tuple(dict.fromkeys(methods))
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise ValueError(f"mask.approx must be null or a '+'-joined choice of {METHODS}, got {self.methods!r}")
        object.__setattr__(self, "methods", tuple(m for m in METHODS if m in methods))
        if not (isinstance(self.tau, int | float) and 0 < self.tau <= 1):
            raise ValueError(f"approx tau must be in (0, 1], got {self.tau!r}")
        if isinstance(self.coarse, bool) or not isinstance(self.coarse, int) or self.coarse < 1:
            raise ValueError(f"approx coarse must be an int >= 1, got {self.coarse!r}")
        if not (isinstance(self.refine, int | float) and 0 <= self.refine <= 1):
            raise ValueError(f"approx refine must be a share in [0, 1], got {self.refine!r}")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 0:
            raise ValueError(f"approx rounds must be an int >= 0, got {self.rounds!r}")
        if isinstance(self.check, bool) or not isinstance(self.check, int) or self.check < 0:
            raise ValueError(f"approx check must be an int >= 0, got {self.check!r}")

    @classmethod
    def of(cls, approx: str | ApproxSettings | None, **settings: Any) -> ApproxSettings | None:
        """None (exact) for a null ``approx``; else the settings (``settings`` replace the defaults)."""
        if approx is None or isinstance(approx, ApproxSettings):
            return approx
        if isinstance(approx, list | tuple):
            approx = "+".join(approx)
        if str(approx).strip().lower() in ("", "none", "null", "exact", "false"):
            return None
        return cls(methods=str(approx), **settings)

    @property
    def name(self) -> str:
        return "+".join(self.methods)


# ---------------------------------------------------------------- projective-field thresholding


class ProjectiveFieldForward(IncrementalForward):
    """:class:`IncrementalForward` whose recomputed patches are truncated to ``tau`` of each map's
    side (projective-field thresholding): approximate, so its plans are never verified against
    plain forwards."""

    def __init__(self, model: nn.Module, clean_inputs: Tensor, *, tau: float = 0.5, **options: Any):
        self.tau = float(tau)
        options["verify"] = 0
        super().__init__(model, clean_inputs, **options)

    def _window_geometry(self, window: Window, arg: Geometry, out_size: tuple[int, int]) -> Geometry | str:
        made = window_geometry(window, arg, out_size)
        if isinstance(made, str) or self.tau >= 1:
            return made
        sizes, starts, los, his, rstarts, rlens = [], [], [], [], [], []
        for axis in (0, 1):
            n_in, n_out = arg.map_size[axis], out_size[axis]
            size, start, lo, hi = made.size[axis], made.start[axis], made.lo[axis], made.hi[axis]
            rstart, rlen = made.region_start[axis], made.region_len[axis]
            cap = max(1, math.ceil(self.tau * n_out))
            if size > cap:
                k, s, d = window.kernel[axis], window.stride[axis], window.dilation[axis]
                pb, pe = window.pads(n_in, axis)
                e = d * (k - 1)
                centre = lo + hi  # twice the centre of the changed interval
                start = ((centre - cap) // 2).clamp(min=0, max=n_out - cap)
                lo, hi = torch.maximum(lo, start), torch.minimum(hi, start + cap)
                hi = torch.maximum(hi, lo + 1)
                size = cap
                rstart = start * s - pb
                rlen = (size - 1) * s + e + 1
                if not window.overhang_ok and int(rstart.max()) + rlen > n_in + pe:
                    return made
            sizes.append(size), starts.append(start), los.append(lo), his.append(hi)
            rstarts.append(rstart), rlens.append(rlen)
        return Geometry(tuple(sizes), tuple(starts), tuple(los), tuple(his), out_size, tuple(rstarts), tuple(rlens))


# ---------------------------------------------------------------- the approximate forward


def approx_forward(approx: ApproxSettings) -> Callable[[nn.Module, Tensor, InterventionSpec], BatchForward]:
    """A ``forward_for`` of :func:`~causal_ie.interventions.engine.pixel_space_effects`: the engine's
    forward with projective-field thresholding and/or bfloat16 autocast."""

    def forward_for(model: nn.Module, inputs: Tensor, spec: InterventionSpec) -> BatchForward:
        with _autocast(approx, inputs.device):
            if "projective" in approx.methods and spec.incremental:
                inner = batch_forward(model, inputs, spec, incremental=ProjectiveFieldForward, tau=approx.tau)
            elif "bf16" in approx.methods:
                # bfloat16 rounding differs between the incremental and the plain forward by more than
                # the exactness check allows: no check (it would fall back to plain forwards)
                inner = batch_forward(model, inputs, spec, verify=0)
            else:
                inner = batch_forward(model, inputs, spec)
        if "bf16" not in approx.methods:
            return inner

        def forward(batch: Tensor, image_idx: Tensor) -> Tensor:
            with _autocast(approx, batch.device):
                return inner(batch, image_idx).float()

        return forward

    return forward_for


def _autocast(approx: ApproxSettings, device: torch.device) -> contextlib.AbstractContextManager:
    if "bf16" not in approx.methods:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# ---------------------------------------------------------------- adaptive drill-down


class WindowSubset:
    """Some windows of a :class:`WindowGrid` per image (``index`` [N, R_max], ``counts`` per image),
    as the engine's ``Regions``."""

    def __init__(self, grid: WindowGrid, index: Tensor, counts: list[int]):
        self.grid, self.index, self.counts = grid, index, counts

    def region_counts(self, n_images: int) -> list[int]:
        return list(self.counts)

    def apply(
        self, inputs: Tensor, image_idx: Tensor, region_idx: Tensor, sample_idx: Tensor, baseline: Baseline
    ) -> Tensor:
        return self.grid.apply(inputs, image_idx, self.index[image_idx, region_idx], sample_idx, baseline)

    def assemble(self, effects: Tensor) -> Tensor:  # pragma: no cover - drill-down scatters itself
        raise NotImplementedError


def coarse_axis(n: int, step: int) -> list[int]:
    """Every ``step``-th index of ``n``, the last one included."""
    picked = list(range(0, n, step))
    if picked[-1] != n - 1:
        picked.append(n - 1)
    return picked


def interpolation_matrix(n: int, picked: list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """[n, len(picked)]: row i interpolates index i linearly between its picked neighbours."""
    out = torch.zeros(n, len(picked), dtype=dtype, device=device)
    for i in range(n):
        j = max(b for b, p in enumerate(picked) if p <= i)
        if picked[j] == i or j == len(picked) - 1:
            out[i, j] = 1.0
        else:
            lo, hi = picked[j], picked[j + 1]
            t = (i - lo) / (hi - lo)
            out[i, j], out[i, j + 1] = 1.0 - t, t
    return out


def drilldown_effects(
    forward: BatchForward, inputs: Tensor, grid: WindowGrid, baseline: Baseline, spec: InterventionSpec,
    approx: ApproxSettings,
) -> Tensor:
    """Window effects [N, K, len(grid)] by adaptive drill-down (see the module docstring)."""
    n = inputs.shape[0]
    device = inputs.device
    n_rows, n_cols = grid.shape
    rows, cols = coarse_axis(n_rows, approx.coarse), coarse_axis(n_cols, approx.coarse)
    coarse = torch.tensor([r * n_cols + c for r in rows for c in cols], device=device)
    stage1 = region_effects(forward, inputs, WindowSubset(grid, coarse.expand(n, -1), [len(coarse)] * n), baseline, spec)
    k = stage1.shape[1]
    a_r = interpolation_matrix(n_rows, rows, stage1.dtype, device)
    a_c = interpolation_matrix(n_cols, cols, stage1.dtype, device)
    estimate = a_r @ stage1.reshape(n, k, len(rows), len(cols)) @ a_c.T  # [N, K, n_rows, n_cols]
    effects = estimate.reshape(n, k, -1).clone()
    effects[:, :, coarse] = stage1
    budget = min(round(approx.refine * len(grid)), len(grid) - len(coarse))
    if budget <= 0:
        return effects
    # A finding's peak may sit between coarse windows: the windows around its best coarse window are
    # refined first (nearest estimate first), for every finding in turn, then those around each
    # finding's second best, ... until the budget is spent.
    coarse_list = coarse.tolist()
    coarse_set = set(coarse_list)
    around: list[list[int]] = []  # per coarse window: the other windows within reach of it
    for w in coarse_list:
        r, c = divmod(w, n_cols)
        around.append([
            rr * n_cols + cc
            for rr in range(max(0, r - approx.coarse + 1), min(n_rows, r + approx.coarse))
            for cc in range(max(0, c - approx.coarse + 1), min(n_cols, c + approx.coarse))
            if rr * n_cols + cc not in coarse_set
        ])
    best_coarse = stage1.argsort(dim=-1, descending=True).cpu()  # [N, K, C]
    chosen = []
    for i in range(n):
        picked: dict[int, None] = {}
        estimates = effects[i].cpu()
        for rank in range(len(coarse_list)):
            for finding in range(k):
                near = around[int(best_coarse[i, finding, rank])]
                for w in sorted(near, key=lambda w: -float(estimates[finding, w])):
                    if w not in picked and len(picked) < budget:
                        picked[w] = None
            if len(picked) >= budget:
                break
        chosen.append(list(picked))
    exact = torch.zeros(n, len(grid), dtype=torch.bool)
    exact[:, coarse_list] = True

    def compute(chosen: list[list[int]]) -> None:
        counts = [len(c) for c in chosen]
        if not any(counts):
            return
        index = torch.zeros(n, max(counts), dtype=torch.long, device=device)
        for i, c in enumerate(chosen):
            index[i, : len(c)] = torch.tensor(c, dtype=torch.long, device=device)
            exact[i, c] = True
        found = region_effects(forward, inputs, WindowSubset(grid, index, counts), baseline, spec)
        for i, c in enumerate(chosen):
            effects[i, :, index[i, : len(c)]] = found[i, :, : len(c)]

    compute(chosen)
    # Stage 3: where a map now peaks on a pixel some window of which is only estimated, compute those
    # windows and look again (at most ``rounds`` times), so every map's maximum rests on exact windows.
    (wh, ww), (sh, sw) = grid.window, grid.stride
    height, width = grid.image_size
    for _ in range(approx.rounds):
        top = grid.fold(effects).flatten(2).argmax(-1).cpu()  # [N, K] flat pixel of each map's maximum
        chosen = []
        for i in range(n):
            wanted: dict[int, None] = {}
            for pixel in top[i].tolist():
                y, x = divmod(pixel, width)
                for r in range(max(0, -(-(y - wh + 1) // sh)), min(n_rows - 1, y // sh) + 1):
                    for c in range(max(0, -(-(x - ww + 1) // sw)), min(n_cols - 1, x // sw) + 1):
                        if not exact[i, r * n_cols + c]:
                            wanted[r * n_cols + c] = None
            chosen.append(list(wanted))
        if not any(chosen):
            break
        compute(chosen)
    return effects


# ---------------------------------------------------------------- the entry point


def approximate_causal_effect(
    model: nn.Module,
    x: Tensor,
    *,
    window: int | tuple[int, int],
    stride: int | tuple[int, int],
    approx: ApproxSettings,
    spec: InterventionSpec | None = None,
) -> Tensor:
    """Approximate sliding-window CE maps [N, K, H, W] (the same placement and meaning as
    :func:`~causal_ie.interventions.causal_effect`), by ``approx``'s methods."""
    spec = spec if spec is not None else InterventionSpec()
    if spec.differentiable:
        raise ValueError("approximate CE (mask.approx) cannot be differentiable")
    effects, grid = pixel_space_effects(
        model, x, lambda inputs: WindowGrid.create(tuple(inputs.shape[-2:]), window, stride), spec,
        forward_for=approx_forward(approx),
        effects_for=functools.partial(drilldown_effects, approx=approx) if "drilldown" in approx.methods else None,
    )
    return grid.assemble(effects).to(x.device)


# ---------------------------------------------------------------- measured error


def map_agreement(approx_maps: Tensor, exact_maps: Tensor, window: tuple[int, int]) -> dict[str, Tensor]:
    """Per map ([..., H, W] each): ``rel_error`` max |approx - exact| / max |exact|; ``same_place``
    whether the approximate map's maximum lies on a maximal pixel of the exact map (within 1e-6 of
    its largest value); ``same_window`` whether it lies within one window (|dy| < window height,
    |dx| < window width) of the exact map's first maximum."""
    a = approx_maps.reshape(-1, *approx_maps.shape[-2:]).double()
    e = exact_maps.reshape(-1, *exact_maps.shape[-2:]).double()
    scale = e.abs().flatten(1).amax(1)
    rel = (a - e).abs().flatten(1).amax(1) / scale.clamp(min=1e-12)
    width = e.shape[-1]
    top_a = a.flatten(1).argmax(1)
    top_e = e.flatten(1).argmax(1)
    value_at = e.flatten(1).gather(1, top_a[:, None])[:, 0]
    same_place = value_at >= e.flatten(1).amax(1) - 1e-6 * scale
    dy = (top_a // width - top_e // width).abs()
    dx = (top_a % width - top_e % width).abs()
    same_window = same_place | ((dy < window[0]) & (dx < window[1]))
    return {"rel_error": rel, "same_place": same_place, "same_window": same_window}


class ApproxCheck:
    """Measures an approximate explainer against the exact maps on its first ``approx.check`` images."""

    def __init__(self, approx: ApproxSettings):
        self.approx = approx
        self.images = 0
        self.rel: list[Tensor] = []
        self.same_place: list[Tensor] = []
        self.same_window: list[Tensor] = []
        self.predicted: list[Tensor] = []  # per map: the model predicts its finding (prob >= 0.5)
        self.seconds_approx = 0.0
        self.seconds_exact = 0.0
        self.images_timed = 0

    @property
    def wanted(self) -> int:
        """Images still to check."""
        return max(0, self.approx.check - self.images)

    def run(
        self, images: Tensor, approximate: Callable[[Tensor], Tensor], exact: Callable[[Tensor], Tensor],
        window: tuple[int, int], predicted: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """``approximate(images)``; for the first images still wanted, ``exact`` too, and their errors
        (``predicted(images)``: bool [n, K], the findings the model predicts, scored apart)."""
        start = time.perf_counter()
        maps = approximate(images)
        approx_s = time.perf_counter() - start
        take = min(self.wanted, images.shape[0])
        if take:
            start = time.perf_counter()
            reference = exact(images[:take])
            self.seconds_exact += time.perf_counter() - start
            self.seconds_approx += approx_s * take / images.shape[0]
            self.images_timed += take
            self.update(maps[:take], reference, window, None if predicted is None else predicted(images[:take]))
        return maps

    def update(
        self, approx_maps: Tensor, exact_maps: Tensor, window: tuple[int, int], predicted: Tensor | None = None
    ) -> None:
        found = map_agreement(approx_maps, exact_maps, window)
        self.rel.append(found["rel_error"].cpu())
        self.same_place.append(found["same_place"].cpu())
        self.same_window.append(found["same_window"].cpu())
        if predicted is not None and predicted.shape == approx_maps.shape[:2]:
            self.predicted.append(predicted.reshape(-1).bool().cpu())
        self.images += approx_maps.shape[0]

    def summary(self) -> dict[str, Any] | None:
        """The ``approx_error`` block of results.json (None before any image was checked)."""
        if not self.rel:
            return None
        rel = torch.cat(self.rel)
        out: dict[str, Any] = {
            "method": self.approx.name,
            "images": int(self.images),
            "maps": int(rel.numel()),
            "max_rel_error": float(rel.max()),
            "mean_rel_error": float(rel.mean()),
            "pointing_agreement": float(torch.cat(self.same_place).double().mean()),
            "window_agreement": float(torch.cat(self.same_window).double().mean()),
            "speedup": self.seconds_exact / self.seconds_approx if self.seconds_approx > 0 else float("nan"),
        }
        if self.predicted and len(self.predicted) == len(self.same_place):
            predicted = torch.cat(self.predicted)
            out["predicted_maps"] = int(predicted.sum())
            if predicted.any():
                out["predicted_pointing_agreement"] = float(torch.cat(self.same_place)[predicted].double().mean())
                out["predicted_window_agreement"] = float(torch.cat(self.same_window)[predicted].double().mean())
        if "projective" in self.approx.methods:
            out["tau"] = float(self.approx.tau)
        if "drilldown" in self.approx.methods:
            out["coarse"] = int(self.approx.coarse)
            out["refine"] = float(self.approx.refine)
            out["rounds"] = int(self.approx.rounds)
        return out
