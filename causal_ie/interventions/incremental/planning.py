"""Planning: which nodes run on patches and where the rest runs in full (the cut), by a cost model.

For a box size, :class:`Planner` follows the box through every node (:mod:`.geometry`), then
picks the cut: the first map whose patch covers more than a share of it, the share chosen by
the estimated cost (multiply-adds of convolutions and linears plus a cost per activation
element moved), and lists the clean maps the plan reads (with the margins region ops need), the
union inputs that must be widened and the maps materialised at the cut.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import Tensor

from causal_ie.interventions.incremental.geometry import (
    Geometry,
    ResampleAxis,
    resample_geometry,
    window_geometry,
)
from causal_ie.interventions.incremental.rules import REGION_KINDS, Analysis, Resample, Window

CUT_AUTO = "auto"
# `supported` needs an estimated speed-up of at least this for a one-pixel box
MIN_GAIN = 1.1
# The cost model that places the cut, in FLOP-equivalents of eager CPU convolution (measured with one
# thread on this project's 2-core machine, timm resnet18/densenet121 at 224 px: convolutions
# 120-230 GFLOP/s, BatchNorm 2.3 G elements/s; pooling: rules.POOL_COST per tap):
# per activation element a memory-bound op (copy, BatchNorm, ReLU, add, cat) reads or writes,
ELEMENT_COST = 40.0
# FLOP-equivalents of the Python work per item and region copy (a few microseconds)
ITEM_COST = 2e5
# plans estimated within this share of the cheapest count as equal (the earliest cut wins)
COST_TOLERANCE = 0.03


@dataclass
class Plan:
    box: tuple[int, int]
    threshold: float
    modes: dict[str, str]  # inc | full | const | meta
    geometry: dict[str, Geometry]
    caches: dict[tuple[str, float], list[int]]  # (node, pad value) -> margins top, bottom, left, right
    window_cache: dict[str, tuple[str, float]]  # window node -> cache key of its input
    expand: dict[tuple[str, str], bool]  # (union node, arg) -> the arg's patch must be widened
    materialize: set[str]
    cost: float
    full_cost: float
    cut: str
    plain: bool  # no gain: run plain forwards
    last_use: dict[str, int] = field(default_factory=dict)
    checked: bool = False
    # the network after the cut as one callable (``suffix_compiler``), its inputs and the nodes it runs
    suffix: Callable[..., Tensor] | None = None
    suffix_inputs: list[str] = field(default_factory=list)
    suffix_tried: bool = False

    @property
    def gain(self) -> float:
        return self.full_cost / self.cost if self.cost > 0 else 1.0


class Planner:
    """Plans for one traced model and input size.

    Args:
        analysis: the traced graph and its rules.
        shapes: each node's value shape without the batch dimension (filled by the clean pass).
        consts: the values of the nodes that do not depend on the input.
        image_size: (H, W) of the input.
        images, element_size: clean images cached and bytes per value (for the cache's size).
        dtype, device: of the resampling weights.
        window_geometry: the rule for window ops (approximate engines replace it).
    """

    def __init__(
        self, analysis: Analysis, shapes: dict[str, tuple[int, ...] | None], consts: dict[str, object],
        image_size: tuple[int, int], *, images: int, element_size: int, dtype: torch.dtype, device: torch.device,
        window_geometry: Callable[[Window, Geometry, tuple[int, int]], Geometry | str] = window_geometry,
    ):
        self.analysis = analysis
        self._shapes = shapes
        self._consts = consts
        self.image_size = image_size
        self.images = images
        self.element_size = element_size
        self.dtype, self.device = dtype, device
        self.window_geometry = window_geometry
        self.resampling: dict[str, tuple[ResampleAxis, ...]] = {}  # resampling node -> weights per axis

    def spatial(self, name: str) -> tuple[int, int] | None:
        shape = self._shapes.get(name)
        return (shape[-2], shape[-1]) if shape is not None and len(shape) == 3 else None

    def geometry(self, box: tuple[int, int]) -> tuple[dict[str, Geometry], dict[str, str]]:
        """Geometry of every node the changed box can be followed through, and for the first nodes
        where it cannot, why."""
        ops, geometry, stops = self.analysis.ops, {}, {}
        height, width = self.image_size
        for node in self.analysis.nodes:
            op = ops[node.name]
            size = self.spatial(node.name)
            if op.kind == "input":
                lo = (torch.arange(height - box[0] + 1), torch.arange(width - box[1] + 1))
                hi = (lo[0] + box[0], lo[1] + box[1])
                geometry[node.name] = Geometry(box, lo, lo, hi, (height, width))
                continue
            if op.kind not in ("pointwise", "union", "window", "resample"):
                if op.kind == "global" and any(a in geometry for a in op.acts):
                    stops[node.name] = op.why or "no incremental rule"
                continue
            if not all(a in geometry for a in op.acts):
                continue
            args = [geometry[a] for a in op.acts]
            if size is None or (op.kind not in REGION_KINDS and any(g.map_size != size for g in args)):
                stops[node.name] = "changes the map's shape"
                continue
            if op.kind == "pointwise":
                if not self.constants_pointwise(node):
                    stops[node.name] = "a constant argument varies over space"
                    continue
                geometry[node.name] = args[0]
            elif op.kind == "union":
                lo = tuple(torch.stack([g.lo[a] for g in args]).amin(0) for a in (0, 1))
                hi = tuple(torch.stack([g.hi[a] for g in args]).amax(0) for a in (0, 1))
                sizes = tuple(max(1, int((hi[a] - lo[a]).max())) for a in (0, 1))
                start = tuple(lo[a].clamp(max=size[a] - sizes[a]) for a in (0, 1))
                geometry[node.name] = Geometry(sizes, start, lo, hi, size)
            else:
                if op.kind == "window":
                    made = self.window_geometry(op.window, args[0], size)
                else:
                    made = resample_geometry(self.resample_axes(node.name, op.resample, args[0].map_size), args[0], size)
                if isinstance(made, str):
                    stops[node.name] = made
                else:
                    geometry[node.name] = made
        return geometry, stops

    def resample_axes(self, name: str, resample: Resample, in_size: tuple[int, int]) -> tuple[ResampleAxis, ...]:
        """The weight matrices of a resampling node per axis (computed once)."""
        if name not in self.resampling:
            dtype, device = self.dtype, self.device
            self.resampling[name] = tuple(
                ResampleAxis.of(resample.matrix(in_size[axis], axis, dtype, device)) for axis in (0, 1)
            )
        return self.resampling[name]

    def constants_pointwise(self, node: fx.Node) -> bool:
        """Constant tensor arguments must not vary over space (their last two dims broadcast)."""
        ok = True

        def check(n: fx.Node) -> fx.Node:
            nonlocal ok
            value = self._consts.get(n.name)
            if isinstance(value, Tensor) and value.dim() >= 1:
                if value.shape[-1] != 1 or (value.dim() >= 2 and value.shape[-2] != 1):
                    ok = False
            return n

        fx.node.map_arg((node.args, node.kwargs), check)
        return ok

    def modes(self, geometry: dict[str, Geometry], threshold: float) -> dict[str, str]:
        """inc for the nodes whose patch covers at most ``threshold`` of their map and whose inputs
        are all inc; full from there on."""
        modes: dict[str, str] = {}
        for node in self.analysis.nodes:
            op = self.analysis.ops[node.name]
            if op.kind == "const":
                modes[node.name] = "const"
            elif op.kind == "input":
                modes[node.name] = "inc"
            elif op.kind == "meta":
                modes[node.name] = "meta"
            elif (
                node.name in geometry
                and all(modes[a] == "inc" for a in op.acts)
                and geometry[node.name].fraction <= threshold
            ):
                modes[node.name] = "inc"
            else:
                modes[node.name] = "full"
        return modes

    def cost(self, modes: dict[str, str], geometry: dict[str, Geometry]) -> float:
        """Estimated cost per perturbed input: multiply-adds of convs and linears, plus
        :data:`ELEMENT_COST` per activation element read or written."""
        total = 0.0
        materialized: set[str] = set()
        for node in self.analysis.nodes:
            op, mode = self.analysis.ops[node.name], modes[node.name]
            shape = self._shapes.get(node.name)
            if mode in ("const", "meta") or op.kind == "input":
                continue
            channels = shape[0] if shape else 0
            if mode == "inc":
                g = geometry[node.name]
                out = channels * g.size[0] * g.size[1]
                if op.kind == "window":
                    in_channels = self._shapes[op.acts[0]][0]
                    region = in_channels * g.region_len[0] * g.region_len[1]
                    total += op.window.flops * out + ELEMENT_COST * (region + out) + ITEM_COST
                elif op.kind == "resample":  # two dense matrix products on the region
                    (rh, rw), (h, w) = g.region_len, g.size
                    region = channels * rh * rw
                    total += 2 * channels * (rh * rw * w + h * rh * w) + ELEMENT_COST * (region + out) + ITEM_COST
                else:
                    total += ELEMENT_COST * 2 * out
                    if op.kind == "union":  # widening the inputs whose patch is smaller
                        total += sum(
                            ITEM_COST + ELEMENT_COST * self._shapes[a][0] * g.size[0] * g.size[1]
                            for a in op.acts
                            if geometry[a].size != g.size
                        )
                continue
            numel = math.prod(shape) if shape else 0
            ins = [a for a in op.acts if self._shapes.get(a)]
            for a in ins:
                if modes.get(a) == "inc" and a not in materialized:
                    materialized.add(a)
                    total += ELEMENT_COST * 2 * math.prod(self._shapes[a]) + ITEM_COST
            if op.kind == "window":
                total += op.window.flops * numel
            elif op.kind == "resample" and node.name in self.resampling:  # one pass per axis over its taps
                total += 2 * numel * sum(axis.taps for axis in self.resampling[node.name])
            total += 2 * op.linear_macs
            total += ELEMENT_COST * (numel + sum(math.prod(self._shapes[a]) for a in ins))
        return total

    def first_stop(self, stops: dict[str, str], modes: dict[str, str]) -> str:
        """The first op the changed box cannot be followed through, with why."""
        for node in self.analysis.nodes:
            if node.name in stops and all(modes.get(a) == "inc" for a in self.analysis.ops[node.name].acts):
                return f"{self.analysis.ops[node.name].what}: {stops[node.name]}"
        return ""

    def one_pixel_gain(self) -> tuple[float, str]:
        """The estimated gain of a one-pixel box, and the first op the box cannot pass."""
        geometry, stops = self.geometry((1, 1))
        modes = self.modes(geometry, 1.0)
        full = self.cost(self.modes(geometry, -1.0), geometry)
        best = self.cost(modes, geometry)
        return (full / best if best > 0 else 1.0), self.first_stop(stops, modes)

    def choose(self, box: tuple[int, int], cut_fraction: float | str, cache_limit: int | None) -> Plan:
        """The plan for boxes of size ``box``: at ``cut_fraction`` of the map, or with ``"auto"`` the
        cheapest estimate (plans within :data:`COST_TOLERANCE` count as equal, the earliest cut
        wins) whose caches fit ``cache_limit`` bytes."""
        geometry, stops = self.geometry(box)
        no_inc = self.modes(geometry, -1.0)
        full_cost = self.cost(no_inc, geometry)
        if cut_fraction == CUT_AUTO:
            scored = []
            for t in sorted({g.fraction for g in geometry.values()}):
                modes = self.modes(geometry, t)
                scored.append((self.cost(modes, geometry), t, modes))
            # among plans within COST_TOLERANCE of the cheapest, the earliest cut (less cached memory,
            # fewer small ops); then the rest by cost
            near = min(c for c, _, _ in scored) * (1 + COST_TOLERANCE)
            scored = sorted((s for s in scored if s[0] <= near), key=lambda s: s[1]) + sorted(
                (s for s in scored if s[0] > near), key=lambda s: s[0]
            )
            plan = None
            for cost, threshold, modes in scored:  # the cheapest plan whose caches fit the limit
                plan = self.build_plan(box, threshold, modes, geometry, cost, full_cost, stops)
                if cache_limit is None or self.plan_bytes(plan) <= cache_limit:
                    break
            else:
                plan = min((self.build_plan(box, t, m, geometry, c, full_cost, stops) for c, t, m in scored),
                           key=self.plan_bytes)
        else:
            threshold = float(cut_fraction)
            modes = self.modes(geometry, threshold)
            plan = self.build_plan(box, threshold, modes, geometry, self.cost(modes, geometry), full_cost, stops)
        return plan

    def build_plan(
        self, box: tuple[int, int], threshold: float, modes: dict[str, str], geometry: dict[str, Geometry],
        cost: float, full_cost: float, stops: dict[str, str],
    ) -> Plan:
        """The caches (with the margins each window op reads), widenings and materialisations of a
        choice of modes."""
        ops = self.analysis.ops
        caches: dict[tuple[str, float], list[int]] = {}
        window_cache: dict[str, tuple[str, float]] = {}
        expand: dict[tuple[str, str], bool] = {}
        materialize: set[str] = set()

        def need(name: str, value: float, margins: list[int]) -> tuple[str, float]:
            have = caches.setdefault((name, value), [0, 0, 0, 0])
            caches[(name, value)] = [max(a, b) for a, b in zip(have, margins)]
            return (name, value)

        def any_cache(name: str) -> tuple[str, float]:
            for key in caches:
                if key[0] == name:
                    return key
            return need(name, 0.0, [0, 0, 0, 0])

        inc_nodes = [n for n in self.analysis.nodes if modes[n.name] == "inc"]
        input_name = next(n.name for n in self.analysis.nodes if n.op == "placeholder")
        for node in inc_nodes:
            op, g = ops[node.name], geometry[node.name]
            if op.kind in REGION_KINDS:
                arg = geometry[op.acts[0]]
                margins = []
                for axis in (0, 1):
                    lo_r = int(g.region_start[axis].min())
                    hi_r = int(g.region_start[axis].max()) + g.region_len[axis]
                    margins += [max(0, -lo_r), max(0, hi_r - arg.map_size[axis])]
                window_cache[node.name] = need(op.acts[0], op.pad_value, margins)
        for node in inc_nodes:
            op, g = ops[node.name], geometry[node.name]
            if op.kind == "union":
                for a in op.acts:
                    ga = geometry[a]
                    same = ga.size == g.size and all(torch.equal(ga.start[x], g.start[x]) for x in (0, 1))
                    expand[(node.name, a)] = not same
                    if not same:
                        any_cache(a)
        for node in self.analysis.nodes:
            if modes[node.name] == "full":
                for a in node.all_input_nodes:
                    if modes[a.name] == "inc":
                        materialize.add(a.name)
        for name in materialize:
            any_cache(name)
        any_cache(input_name)  # clipped boxes read the clean input around them
        last_use: dict[str, int] = {}
        for i, node in enumerate(self.analysis.nodes):
            for a in node.all_input_nodes:
                last_use[a.name] = i
        full_nodes = [n for n in self.analysis.nodes if modes[n.name] == "full" and n.op != "output"]
        cut = self.describe_cut(inc_nodes, full_nodes, stops, threshold)
        plain = cost >= full_cost or len(inc_nodes) <= 1
        return Plan(box, threshold, modes, geometry, caches, window_cache, expand, materialize, cost, full_cost,
                     cut, plain, last_use)

    def describe_cut(
        self, inc_nodes: list[fx.Node], full_nodes: list[fx.Node], stops: dict[str, str], threshold: float
    ) -> str:
        if not full_nodes:
            return "no cut: the whole network runs incrementally"
        first = full_nodes[0]
        last_inc = inc_nodes[-1] if inc_nodes else None
        op = self.analysis.ops[first.name]
        if first.name in stops:
            why = f"no rule ({stops[first.name]})"
        elif op.kind == "global":
            why = f"global op ({op.why})"
        else:
            why = f"patch over {threshold:.0%} of the map"
        after = f" after {self.analysis.ops[last_inc.name].what}" if last_inc is not None else ""
        return f"full from {op.what}{after}: {why}"

    def plan_bytes(self, plan: Plan) -> int:
        """Memory of the clean maps ``plan`` caches, for all clean images."""
        per_image = sum(
            self._shapes[name][0] * (self._shapes[name][1] + m[0] + m[1]) * (self._shapes[name][2] + m[2] + m[3])
            for (name, _), m in plan.caches.items()
        )
        return per_image * self.images * self.element_size
