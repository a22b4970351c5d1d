"""Running a model incrementally: the clean pass that fills the caches, and patched forwards.

:class:`IncrementalForward` traces the model once (:mod:`.rules`), plans per box size
(:mod:`.planning`), caches the clean maps each plan reads (padded by the margins its region ops
need), and per batch recomputes every node's patch from regions of its input read from the
cached clean map with the item's patch written over it, then runs the rest in full.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from causal_ie.interventions.incremental.boxes import changed_boxes
from causal_ie.interventions.incremental.geometry import Geometry, window_geometry
from causal_ie.interventions.incremental.planning import CUT_AUTO, MIN_GAIN, Plan, Planner
from causal_ie.interventions.incremental.rules import analyse
from causal_ie.runtime import eval_mode

log = logging.getLogger(__name__)

# default bound on the cached clean maps of all images, in bytes
CACHE_LIMIT = 4 * 2**30
# clean images per clean forward (bounds the memory of the one-off clean pass)
CLEAN_BATCH = 16


@dataclass
class _Patch:
    """Values [B, C, h, w] of a node's map at rows r0[b]:r0[b]+h, cols c0[b]:c0[b]+w; the rest of the
    map equals the clean activation of the item's image."""

    data: Tensor
    r0: list[int]
    c0: list[int]


@contextlib.contextmanager
def _serial() -> Iterator[None]:
    """One intra-op thread for a loop of small copies. A copy of more than 32768 elements runs on all
    threads, and on a busy machine each such parallel region can wait milliseconds for its second
    thread to be scheduled (measured: 10 ms per 200 KB copy at load 4 on 2 cores, against 0.02 ms
    single-threaded); a loop of them per item would pay that every time."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _region_copy(
    out: Tensor, src: Tensor, index: list[int], rows: list[int], cols: list[int], fused: bool | None = None
) -> None:
    """out[b] = src[index[b], :, rows[b]:+h, cols[b]:+w] for every b (h, w from ``out``); ``fused``
    (default: on GPUs) gathers all items with one indexing kernel."""
    h, w = out.shape[-2:]
    if fused if fused is not None else (out.device.type != "cpu" and len(index) > 1):
        device = src.device
        windows = src.unfold(2, h, 1).unfold(3, w, 1)
        out.copy_(windows[torch.tensor(index, device=device), :, torch.tensor(rows, device=device),
                          torch.tensor(cols, device=device)])
        return
    # On CPU a copy per item beats one fused gather by ~10x (advanced indexing computes an offset per
    # element; here each item is a few contiguous rows): measured 1 ms vs 11 ms for 64 items.
    with _serial():
        for b, (i, r, c) in enumerate(zip(index, rows, cols)):
            out[b].copy_(src[i, :, r:r + h, c:c + w])


def _overlay(out: Tensor, patch: _Patch, rows: list[int], cols: list[int]) -> None:
    """Write ``patch`` into regions ``out`` [B, C, R, W'] whose top-left corners are (rows[b], cols[b]),
    clipped to the region."""
    data = patch.data
    h, w = data.shape[-2:]
    height, width = out.shape[-2:]
    dy = [p - r for p, r in zip(patch.r0, rows)]
    dx = [p - c for p, c in zip(patch.c0, cols)]
    with _serial():
        if len(set(dy)) == 1 and len(set(dx)) == 1 and 0 <= dy[0] <= height - h and 0 <= dx[0] <= width - w:
            out[:, :, dy[0]:dy[0] + h, dx[0]:dx[0] + w].copy_(data)  # the same place in every region
            return
        for b, (y, x) in enumerate(zip(dy, dx)):
            y0, y1, x0, x1 = max(0, y), min(height, y + h), max(0, x), min(width, x + w)
            if y1 > y0 and x1 > x0:
                out[b, :, y0:y1, x0:x1].copy_(data[b, :, y0 - y:y1 - y, x0 - x:x1 - x])


class IncrementalForward:
    """Logits of perturbed copies of ``clean_inputs`` that differ from them only inside boxes,
    computed by recomputing the changed neighbourhoods only (see the module docstring).

    Args:
        model: the classifier, traced once per model, device and dtype. Traced and its clean
            activations computed in eval mode whatever its flags; calls need it in eval mode.
        clean_inputs: the unperturbed images [N, C, H, W]; their activations are cached once
            (lazily, per window size, only the maps the plan reads).
        cut_fraction: run the rest in full from the first map whose recomputed patch covers more
            than this share of the map; ``"auto"``: the share with the lowest estimated cost
            (plans within :data:`COST_TOLERANCE` of it count as equal, the earliest cut wins).
        memory_format: of cached and recomputed maps; None: channels_last when the model's conv
            weights are channels_last, else contiguous (the plain forward's).
        skip_unchanged: items whose box equals the clean pixels get the clean logits (exact 0 effect).
        verify: on a plan's first batch, compare this many items with the plain forward; on a
            mismatch (> 1e-4 times the logit scale) the plan falls back to plain forwards.
        cache_limit: bytes the cached clean maps of all images may take; with ``cut_fraction="auto"``
            the cut moves earlier to stay below (None: no limit). At 224 px resnet18 caches ~10 MB
            and densenet121 ~37 MB per image (:meth:`describe`).
        plain_forward: what runs full forwards of perturbed images (models it cannot follow,
            plans that gain nothing); default the model itself (e.g. a compiled model instead).
        suffix_compiler: called once per plan with the network after the cut as an
            ``fx.GraphModule`` (its inputs: the maps at the cut, whole) and which of its inputs
            have a batch dimension; returns the callable that runs it (e.g. compiled), or None to
            run it node by node as without it.

    Attributes:
        supported: False when the model runs plain forwards (``reason`` says why).
        reason: why it falls back ("" when supported).
    """

    def __init__(
        self,
        model: nn.Module,
        clean_inputs: Tensor,
        *,
        cut_fraction: float | str = CUT_AUTO,
        memory_format: torch.memory_format | None = None,
        skip_unchanged: bool = True,
        verify: int = 2,
        cache_limit: int | None = CACHE_LIMIT,
        plain_forward: Callable[[Tensor], Tensor] | None = None,
        suffix_compiler: Callable[[fx.GraphModule, tuple[bool, ...]], Callable[..., Tensor] | None] | None = None,
    ):
        if not isinstance(clean_inputs, Tensor) or clean_inputs.dim() != 4:
            raise ValueError(f"clean_inputs must be images [N, C, H, W], got {getattr(clean_inputs, 'shape', None)}")
        if not (cut_fraction == CUT_AUTO or (isinstance(cut_fraction, float | int) and 0 <= cut_fraction <= 1)):
            raise ValueError(f"cut_fraction must be 'auto' or a share in [0, 1], got {cut_fraction!r}")
        self.model = model
        self.plain_forward = plain_forward if plain_forward is not None else model
        self.suffix_compiler = suffix_compiler
        self.cut_fraction = cut_fraction
        self.skip_unchanged = skip_unchanged
        self.verify = int(verify)
        self.cache_limit = cache_limit
        self.clean_inputs = clean_inputs.detach().clone()
        self.image_size = tuple(clean_inputs.shape[-2:])
        self.memory_format = memory_format if memory_format is not None else self._model_format(model)
        self.analysis = analyse(model)
        self._by_name = {n.name: n for n in self.analysis.nodes}
        self.reason = self.analysis.error
        self._modules = dict(model.named_modules())
        self._consts: dict[str, Any] = {}
        self._shapes: dict[str, tuple[int, ...] | None] = {}
        self._caches: dict[tuple[str, float], Tensor] = {}
        self._margins: dict[tuple[str, float], list[int]] = {}  # cache key -> padding top, bottom, left, right
        self._plans: dict[tuple[int, int], Plan] = {}
        self.planner = Planner(
            self.analysis, self._shapes, self._consts, self.image_size, images=clean_inputs.shape[0],
            element_size=clean_inputs.element_size(), dtype=clean_inputs.dtype, device=clean_inputs.device,
            window_geometry=self._window_geometry,
        )
        with torch.no_grad(), eval_mode(model):
            if not self.reason:
                try:
                    self._compute_consts()
                    self.clean_logits = self._clean_pass({})
                except Exception as err:  # noqa: BLE001 - a graph that traces but does not run
                    self.reason = f"the traced graph of {type(model).__name__} does not run ({type(err).__name__}: {err})"
            if self.reason:
                self.clean_logits = torch.cat([model(part) for part in self.clean_inputs.split(CLEAN_BATCH)])
            else:
                self._check_gain()
        self.supported = not self.reason
        if self.reason and self.reason not in self.analysis.logged:
            self.analysis.logged.add(self.reason)
            log.info("incremental inference off for %s, plain forwards instead: %s", type(model).__name__, self.reason)

    # ------------------------------------------------------------ set-up

    @staticmethod
    def _model_format(model: nn.Module) -> torch.memory_format:
        for m in model.modules():  # the first conv weight whose layout is unambiguous (not 1 channel)
            weight = getattr(m, "weight", None)
            if isinstance(m, nn.Conv2d) and weight.dim() == 4:
                nchw, nhwc = weight.is_contiguous(), weight.is_contiguous(memory_format=torch.channels_last)
                if nchw != nhwc:
                    return torch.channels_last if nhwc else torch.contiguous_format
        return torch.contiguous_format

    def _compute_consts(self) -> None:
        for node in self.analysis.nodes:
            if self.analysis.ops[node.name].kind == "const" and node.op != "output":
                self._consts[node.name] = self._execute(node, lambda n: self._consts[n.name])

    def _attr(self, target: str) -> Any:
        value: Any = self.model
        for part in target.split("."):
            value = getattr(value, part)
        return value

    def _execute(self, node: fx.Node, value_of: Callable[[fx.Node], Any]) -> Any:
        """Run ``node`` on argument values given by ``value_of``."""
        args = fx.node.map_arg(node.args, value_of)
        kwargs = fx.node.map_arg(node.kwargs, value_of)
        if node.op == "call_module":
            return self._modules[node.target](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "get_attr":
            return self._attr(node.target)
        if node.op == "output":
            return args[0]
        raise RuntimeError(f"cannot execute node {node.name} ({node.op})")

    def _clean_pass(self, record: dict[str, list[tuple[str, float]]]) -> Tensor:
        """Forward the clean images through the graph (chunks of :data:`CLEAN_BATCH`), copying the
        maps named in ``record`` into their padded caches; returns the logits."""
        nodes = self.analysis.nodes
        last = {}
        for i, node in enumerate(nodes):
            for arg in node.all_input_nodes:
                last[arg.name] = i
        outputs = []
        start = 0
        for chunk in self.clean_inputs.split(CLEAN_BATCH):
            env: dict[str, Any] = {}

            def value_of(n: fx.Node) -> Any:
                return self._consts[n.name] if n.name in self._consts else env[n.name]

            for i, node in enumerate(nodes):
                if node.op == "placeholder":
                    value = chunk.clone()
                elif node.name in self._consts:
                    continue
                else:
                    value = self._execute(node, value_of)
                if node.op == "output":
                    outputs.append(value)
                    break
                if isinstance(value, Tensor) and node.name not in self._shapes:
                    self._shapes[node.name] = tuple(value.shape[1:]) if value.dim() else None
                elif node.name not in self._shapes:
                    self._shapes[node.name] = None
                for key in record.get(node.name, ()):
                    cache = self._caches[key]
                    top, _, left, _ = self._margins[key]
                    h, w = value.shape[-2:]
                    cache[start:start + value.shape[0], :, top:top + h, left:left + w].copy_(value)
                env[node.name] = value
                for arg in node.all_input_nodes:
                    if last.get(arg.name) == i:
                        env.pop(arg.name, None)
            start += chunk.shape[0]
        if not all(isinstance(out, Tensor) and out.dim() == 2 for out in outputs):
            raise ValueError(f"the model must return logits [N, K], got {type(outputs[0]).__name__}")
        return torch.cat(outputs)

    # ------------------------------------------------------------ planning

    # ------------------------------------------------------------ planning

    # the rule for window ops (ProjectiveFieldForward truncates it)
    _window_geometry = staticmethod(window_geometry)

    def _check_gain(self) -> None:
        """The model is worth it if a one-pixel box saves at least :data:`MIN_GAIN`."""
        gain, stop = self.planner.one_pixel_gain()
        if gain < MIN_GAIN:
            self.reason = (
                f"global mixing early in the network at {stop or 'no spatially local ops before the output'}; "
                f"even a one-pixel change would save only {100 * (1 - 1 / gain):.0f}% of the work"
            )

    def _plan(self, box: tuple[int, int]) -> Plan:
        for key in sorted(self._plans):  # a plan for a larger box serves smaller ones
            if key[0] >= box[0] and key[1] >= box[1] and key[0] * key[1] <= 2 * box[0] * box[1]:
                return self._plans[key]
        plan = self._plans[box] = self.planner.choose(box, self.cut_fraction, self.cache_limit)
        if plan.plain:
            log.info("incremental inference: a %dx%d box saves nothing on %s (%s); plain forwards",
                     box[0], box[1], type(self.model).__name__, plan.cut)
        return plan

    def _ensure_caches(self, plan: Plan) -> None:
        """Allocate and fill the padded clean caches the plan reads (one clean pass if any is new)."""
        record: dict[str, list[tuple[str, float]]] = {}
        n = self.clean_inputs.shape[0]
        for key, margins in plan.caches.items():
            old = self._margins.get(key)
            if old is not None and all(a >= b for a, b in zip(old, margins)):
                continue
            if old is not None:
                margins = [max(a, b) for a, b in zip(old, margins)]
            shape = self._shapes[key[0]]
            top, bottom, left, right = margins
            self._caches[key] = torch.empty(
                (n, shape[0], shape[1] + top + bottom, shape[2] + left + right),
                dtype=self.clean_inputs.dtype, device=self.clean_inputs.device, memory_format=self.memory_format,
            ).fill_(key[1])
            self._margins[key] = margins
            record.setdefault(key[0], []).append(key)
        if record:
            self._clean_pass(record)

    @property
    def cache_bytes(self) -> int:
        """Memory held by the cached clean maps."""
        return sum(t.numel() * t.element_size() for t in self._caches.values())

    def describe(self, box: tuple[int, int]) -> dict[str, Any]:
        """The plan for boxes of size ``box``: where the cut lands, estimated gain, cached maps."""
        if not self.supported:
            return {"supported": False, "reason": self.reason}
        plan = self._plan(box)
        inc = [self.analysis.ops[n].what for n, m in plan.modes.items() if m == "inc"]
        return {
            "supported": True, "plain": plan.plain, "cut": plan.cut, "threshold": plan.threshold,
            "estimated_gain": plan.gain, "incremental_nodes": len(inc),
            "cached_maps": sorted({k[0] for k in plan.caches}),
            "cache_bytes_per_image": self.planner.plan_bytes(plan) // self.clean_inputs.shape[0],
        }

    # ------------------------------------------------------------ running

    def __call__(self, perturbed: Tensor, image_idx: Tensor, boxes: Tensor | None = None) -> Tensor:
        """Logits [B, K] of ``perturbed`` [B, C, H, W]; item b is image ``image_idx[b]`` changed at most
        inside ``boxes[b]`` = (row0, row1, col0, col1), end-exclusive. Without ``boxes`` they are the
        bounding boxes of the pixels that differ from the clean images (:func:`changed_boxes`)."""
        if perturbed.dim() != 4 or perturbed.shape[1:] != self.clean_inputs.shape[1:]:
            raise ValueError(
                f"perturbed must be [B, {', '.join(map(str, self.clean_inputs.shape[1:]))}], got {tuple(perturbed.shape)}"
            )
        tight = boxes is None
        if boxes is None:
            boxes = self._changed_boxes(perturbed, image_idx)
        batch = perturbed.shape[0]
        if image_idx.shape != (batch,) or boxes.shape != (batch, 4):
            raise ValueError(f"image_idx must be [B] and boxes [B, 4], got {tuple(image_idx.shape)}, {tuple(boxes.shape)}")
        if any(m.training for m in self.model.modules()):
            raise ValueError("IncrementalForward needs the model in eval mode")
        with torch.no_grad():
            height, width = self.image_size
            boxes = boxes.detach().to("cpu", torch.long).clone()
            boxes[:, 0:2] = boxes[:, 0:2].clamp(0, height)
            boxes[:, 2:4] = boxes[:, 2:4].clamp(0, width)
            index = image_idx.detach().to("cpu", torch.long)
            active = (boxes[:, 1] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 2])
            if self.skip_unchanged and not tight:
                active &= self.changed(perturbed, index, boxes)
            logits = self.clean_logits.index_select(0, index.to(self.clean_logits.device)).clone()
            if not bool(active.any()):
                return logits
            rows = active.nonzero().flatten()
            sub = perturbed if bool(active.all()) else perturbed.index_select(0, rows.to(perturbed.device))
            logits[rows.to(logits.device)] = self._forward(sub, index[rows], boxes[rows]).to(logits.dtype)
            return logits

    def _changed_boxes(self, perturbed: Tensor, image_idx: Tensor) -> Tensor:
        """:func:`changed_boxes` against each item's clean image, compared by broadcasting per image
        (no copy of the clean images per item: at 1024 px a batch of 32 would copy 128 MB)."""
        if image_idx.shape != (perturbed.shape[0],):
            raise ValueError(f"image_idx must be [B], got {tuple(image_idx.shape)}")
        index = image_idx.detach().to("cpu", torch.long)
        boxes = torch.zeros((perturbed.shape[0], 4), dtype=torch.long)
        for i in index.unique().tolist():
            rows = (index == i).nonzero().flatten()
            part = perturbed if rows.numel() == perturbed.shape[0] else perturbed.index_select(0, rows.to(perturbed.device))
            boxes[rows] = changed_boxes(part, self.clean_inputs[i:i + 1].to(perturbed.device))
        return boxes

    def changed(self, perturbed: Tensor, image_idx: Tensor, boxes: Tensor) -> Tensor:
        """Bool [B]: whether ``perturbed[b]`` differs from its clean image inside ``boxes[b]``."""
        out = torch.zeros(perturbed.shape[0], dtype=torch.bool)
        with _serial():
            for b, (i, (r0, r1, c0, c1)) in enumerate(zip(image_idx.tolist(), boxes.tolist())):
                if r1 > r0 and c1 > c0:
                    clean = self.clean_inputs[i, :, r0:r1, c0:c1]
                    out[b] = not torch.equal(perturbed[b, :, r0:r1, c0:c1], clean.to(perturbed.device))
        return out

    def _forward(self, perturbed: Tensor, index: Tensor, boxes: Tensor) -> Tensor:
        if not self.supported:
            return self.plain_forward(perturbed)
        box = (int((boxes[:, 1] - boxes[:, 0]).max()), int((boxes[:, 3] - boxes[:, 2]).max()))
        plan = self._plan(box)
        if plan.plain:
            return self.plain_forward(perturbed)
        self._ensure_caches(plan)
        if self.suffix_compiler is not None and not plan.suffix_tried:
            plan.suffix_tried = True
            self._compile_suffix(plan)
        logits = self._run(plan, perturbed, index, boxes)
        if not plan.checked and self.verify > 0:
            plan.checked = True
            k = min(self.verify, perturbed.shape[0])
            plain = self.model(perturbed[:k])
            scale = max(1.0, float(plain.abs().max()))
            diff = float((logits[:k] - plain).abs().max())
            if diff > 1e-4 * scale:
                plan.plain = True
                log.warning(
                    "incremental inference of %s differs from the plain forward by %.3g for %dx%d boxes; "
                    "plain forwards instead (please report)", type(self.model).__name__, diff, *box,
                )
                return self.plain_forward(perturbed)
        return logits

    def _run(self, plan: Plan, perturbed: Tensor, index: Tensor, boxes: Tensor) -> Tensor:
        height, width = self.image_size
        h, w = plan.box
        probe_r = boxes[:, 0].clamp(max=height - h)
        probe_c = boxes[:, 2].clamp(max=width - w)
        images = index.tolist()
        env: dict[str, Any] = {}
        full_values: dict[str, Tensor] = {}
        batch = perturbed.shape[0]

        def full_value(n: fx.Node) -> Any:
            name = n.name
            mode = plan.modes[name]
            if mode == "const":
                return self._consts[name]
            if mode == "inc":
                if name not in full_values:
                    full_values[name] = self._assemble(
                        self._cache_key(plan, name), env[name], images, [0] * batch, [0] * batch,
                        plan.geometry[name].map_size,
                    )
                return full_values[name]
            return env[name]

        for i, node in enumerate(self.analysis.nodes):
            name, mode = node.name, plan.modes[node.name]
            op = self.analysis.ops[name]
            if mode == "const":
                continue
            if node.op == "output":
                if plan.suffix is not None:
                    result = plan.suffix(*(full_value(self._node(n)) for n in plan.suffix_inputs))
                else:
                    result = self._execute(node, full_value)
                break
            if plan.suffix is not None and mode == "full":
                continue  # the suffix runs it
            if mode == "meta":
                env[name] = self._execute(node, lambda n: self._meta_value(plan, n, env, batch))
            elif mode == "full":
                env[name] = self._execute(node, full_value)
            elif op.kind == "input":
                env[name] = self._input_patch(plan, perturbed, images, boxes, probe_r, probe_c)
            else:
                g = plan.geometry[name]
                r0, c0 = g.start[0][probe_r].tolist(), g.start[1][probe_c].tolist()
                if op.kind == "pointwise":
                    arg = env[op.acts[0]]
                    data = self._execute(node, lambda n: arg.data if n.name == op.acts[0] else self._other(n, env))
                    env[name] = _Patch(data, arg.r0, arg.c0)
                elif op.kind == "union":
                    def value_of(n: fx.Node, r0=r0, c0=c0, g=g) -> Any:
                        if n.name not in op.acts:
                            return self._other(n, env)
                        patch = env[n.name]
                        if not plan.expand[(name, n.name)]:
                            return patch.data
                        return self._assemble(self._cache_key(plan, n.name), patch, images, r0, c0, g.size)
                    env[name] = _Patch(self._execute(node, value_of), r0, c0)
                else:  # window or resample: from a region of the input map
                    arg = env[op.acts[0]]
                    rr = g.region_start[0][probe_r].tolist()
                    rc = g.region_start[1][probe_c].tolist()
                    region = self._assemble(plan.window_cache[name], arg, images, rr, rc, g.region_len)
                    if op.kind == "window":
                        env[name] = _Patch(op.window.apply(region), r0, c0)
                    else:
                        env[name] = _Patch(self._resample_region(name, g, region, r0, c0, rr, rc), r0, c0)
                data = env[name].data
                if data.shape[-2:] != g.size:
                    raise RuntimeError(f"{op.what}: patch {tuple(data.shape)} where {g.size} was planned")
            for a in node.all_input_nodes:
                if plan.last_use.get(a.name) == i and a.name not in plan.suffix_inputs:
                    env.pop(a.name, None)
                    full_values.pop(a.name, None)
        return result

    def _resample_region(
        self, name: str, g: Geometry, region: Tensor, r0: list[int], c0: list[int], rr: list[int], rc: list[int]
    ) -> Tensor:
        """Outputs [B, C, *g.size] at (r0[b], c0[b]) of a resampling, from the input regions at (rr[b],
        rc[b]): each item's block of the row and column weights, multiplied in."""
        blocks = []
        for axis, (out0, in0) in enumerate(((r0, rr), (c0, rc))):
            weights = self.planner.resampling[name][axis].weights
            device = weights.device
            outs = torch.tensor(out0, device=device)[:, None] + torch.arange(g.size[axis], device=device)
            ins = torch.tensor(in0, device=device)[:, None] + torch.arange(g.region_len[axis], device=device)
            blocks.append(weights[outs[:, :, None], ins[:, None, :]].unsqueeze(1).to(region.dtype))
        rows, cols = blocks  # [B, 1, h, rh], [B, 1, w, rw]
        return (rows @ region @ cols.transpose(-1, -2)).contiguous(memory_format=self.memory_format)

    def _node(self, name: str) -> fx.Node:
        return self._by_name[name]

    def _compile_suffix(self, plan: Plan) -> None:
        """Hand the network after the cut to ``suffix_compiler`` as one ``fx.GraphModule``: the full
        nodes and the shape nodes they read; its inputs are the maps at the cut (materialised) and
        constants. Shape nodes that read a map not materialised keep the node-by-node path."""
        nodes = self.analysis.nodes
        full = {n.name for n in nodes if plan.modes[n.name] == "full" and n.op != "output"}
        output = nodes[-1] if nodes[-1].op == "output" else next(n for n in nodes if n.op == "output")
        needed_meta: set[str] = set()
        stack = [a for n in nodes if n.name in full or n is output for a in n.all_input_nodes]
        while stack:
            a = stack.pop()
            if plan.modes[a.name] == "meta" and a.name not in needed_meta:
                needed_meta.add(a.name)
                stack.extend(a.all_input_nodes)
        inside = full | needed_meta
        inputs: list[str] = []
        for n in nodes:
            if n.name in inside or n is output:
                for a in n.all_input_nodes:
                    if a.name not in inside and a.name not in inputs:
                        if plan.modes[a.name] == "inc" and a.name not in plan.materialize:
                            return  # a shape read off a patched map: keep node by node
                        inputs.append(a.name)
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for name in inputs:
            env[self._node(name)] = graph.placeholder(f"cut_{name}")
        for n in nodes:
            if n.name in inside or n is output:
                env[n] = graph.node_copy(n, lambda a: env[a])
        try:
            module = fx.GraphModule(self.model, graph, class_name="AfterCut")
            batched = tuple(plan.modes[name] == "inc" for name in inputs)
            runner = self.suffix_compiler(module, batched)
        except Exception as err:  # noqa: BLE001 - keep the node-by-node path
            log.warning("could not build the network after the cut of %s as one module (%s: %s)",
                        type(self.model).__name__, type(err).__name__, err)
            return
        if runner is not None:
            plan.suffix, plan.suffix_inputs = runner, inputs

    def _other(self, n: fx.Node, env: dict[str, Any]) -> Any:
        """A constant or shape-derived argument of an incremental op."""
        return self._consts[n.name] if n.name in self._consts else env[n.name]

    def _meta_value(self, plan: Plan, n: fx.Node, env: dict[str, Any], batch: int) -> Any:
        """Shape-only uses of a patched map see the full map's shape."""
        if n.name in self._consts:
            return self._consts[n.name]
        value = env[n.name]
        if isinstance(value, _Patch):
            shape = self._shapes[n.name]
            return torch.empty((batch, *shape), device="meta", dtype=value.data.dtype)
        return value

    def _cache_key(self, plan: Plan, name: str) -> tuple[str, float]:
        return next(key for key in plan.caches if key[0] == name)

    def _assemble(
        self, key: tuple[str, float], patch: _Patch, images: list[int], rows: list[int], cols: list[int],
        size: tuple[int, int],
    ) -> Tensor:
        """Regions [B, C, *size] of a node's perturbed map with top-left corners (rows[b], cols[b]) (map
        coordinates, may reach into the padding): the cached clean map with the patch written over it."""
        cache = self._caches[key]
        top, _, left, _ = self._margins[key]
        out = torch.empty(
            (len(images), cache.shape[1], *size), dtype=patch.data.dtype, device=patch.data.device,
            memory_format=self.memory_format,
        )
        _region_copy(out, cache, images, [r + top for r in rows], [c + left for c in cols])
        _overlay(out, patch, rows, cols)
        return out

    def _input_patch(
        self, plan: Plan, perturbed: Tensor, images: list[int], boxes: Tensor, probe_r: Tensor, probe_c: Tensor
    ) -> _Patch:
        """The input box of every item, at the planned size: read from ``perturbed`` inside the item's
        box and from the clean image around it (clipped boxes)."""
        h, w = plan.box
        r0, c0 = probe_r.tolist(), probe_c.tolist()
        sizes = (boxes[:, 1] - boxes[:, 0] == h) & (boxes[:, 3] - boxes[:, 2] == w)
        out = torch.empty((len(images), perturbed.shape[1], h, w), dtype=perturbed.dtype, device=perturbed.device,
                          memory_format=self.memory_format)
        if bool(sizes.all()):
            _region_copy(out, perturbed, list(range(len(images))), r0, c0)
            return _Patch(out, r0, c0)
        key = self._cache_key(plan, next(n.name for n in self.analysis.nodes if n.op == "placeholder"))
        top, _, left, _ = self._margins[key]
        _region_copy(out, self._caches[key], images, [r + top for r in r0], [c + left for c in c0])
        with _serial():
            for b, (br0, br1, bc0, bc1) in enumerate(boxes.tolist()):
                out[b, :, br0 - r0[b]:br1 - r0[b], bc0 - c0[b]:bc1 - c0[b]].copy_(perturbed[b, :, br0:br1, bc0:bc1])
        return _Patch(out, r0, c0)


def incremental_support(model: nn.Module, image_shape: tuple[int, int, int]) -> tuple[bool, str]:
    """Whether ``model`` runs incrementally on images of shape (C, H, W), and if not why (one forward
    of a zero image on the model's device)."""
    param = next(itertools.chain(model.parameters(), model.buffers()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    fwd = IncrementalForward(model, torch.zeros((1, *image_shape), device=device, dtype=dtype), verify=0)
    return fwd.supported, fwd.reason


def incremental_forward(
    model: nn.Module, inputs: Tensor, **options: Any
) -> Callable[[Tensor, Tensor], Tensor]:
    """The engine's ``BatchForward`` (perturbed batch, image index -> logits) running incrementally on
    the clean ``inputs``; boxes come from :func:`changed_boxes`, so any pixel-space region kind works
    unchanged (``options`` go to :class:`IncrementalForward`)."""
    fwd = IncrementalForward(model, inputs, **options)
    return lambda batch, image_idx: fwd(batch, image_idx)
