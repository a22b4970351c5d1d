"""Exact incremental inference for pixel-space interventions (issue #15).

A perturbed input that differs from its clean image only inside a known box
changes only a growing neighbourhood of that box in the early feature maps.
:class:`IncrementalForward` recomputes just that neighbourhood, reading the
unchanged context from activations of the clean image cached once, and runs
the rest of the network in full on the patched activation (the *cut*):

- the model is traced with ``torch.fx`` (timm's non-traceable modules and
  functions kept as leaves, as in :mod:`causal_ie.interventions.latent`);
- every node gets a rule for how the changed box moves through it
  (:func:`_classify`): *window* ops (convolutions, max and average pooling:
  kernel, stride, dilation, padding, ``ceil_mode``) grow it by their context and
  recompute it on a region read from the cached clean input, whose border holds
  the op's own padding (0, or -inf for max pooling); *pointwise* ops
  (activations, BatchNorm in eval as an affine, the project's ``Normalize``,
  arithmetic with constants, dropout in eval, per-pixel LayerNorm2d) keep it;
  *union* ops (add/sub/mul/div of two branches, channel ``cat``) take the union
  of their inputs' boxes; anything else (global pooling, ``mean`` over space,
  flatten, linear, attention, ...) is *global*: everything changes from there;
- boxes are tracked per axis for every possible position of the input box
  (all rules are separable in rows and columns), so each node's recomputed
  patch has one size for the whole batch and only its position varies; the
  positions per box are table look-ups at run time;
- where the patch exceeds a share of its map (``cut_fraction``; ``"auto"``
  picks the share with the lowest estimated cost: multiply-adds of the convs
  plus a cost per activation element moved), the rest runs in full;
- models that do not trace, mutate values that are read again later, or mix
  globally so early that nothing is gained, run plain forwards; ``supported``
  and ``reason`` say so (logged once per model).

Exactness: the same kernels run on the same values; only the spatial extent
of each op differs. Pointwise ops, pooling and copies are bitwise equal. On
CPU a convolution of a region with padding 0 gives the bitwise values of the
padded full convolution for most shapes (3x3 and 1x1 stride-1 convs, depthwise
convs, NCHW stems); oneDNN picks another kernel for some shapes (seen: 1x1
stride-2 convs in NCHW, the 1-channel 7x7 stem in channels_last, 1x1 convs on
small patches), which changes the last bit (~1e-7 relative), as the plain
forward itself may between batch sizes. Through a network that grows to about
1e-6 of the largest logit (3e-6 on a mobilenetv2): 2.4e-6 to 3.3e-6 absolute
for resnet18 and densenet121 Classifiers at 224 px with logits up to 7
(benchmarks/results/incremental.md); the tests hold every model to 1e-5.

Interface for the engine::

    fwd = IncrementalForward(model, clean_inputs)         # traced once per model
    logits = fwd(perturbed, image_idx, boxes)              # [B, K]
    forward = incremental_forward(model, clean_inputs)     # the engine's BatchForward, boxes inferred

``boxes`` [B, 4] are (row0, row1, col0, col1), end-exclusive, bounding the
pixels in which ``perturbed[b]`` may differ from ``clean_inputs[image_idx[b]]``
(only those pixels of ``perturbed`` are read); without ``boxes`` they are the
bounding boxes of the pixels that differ (:func:`changed_boxes`). An empty
box (row1 <= row0 or col1 <= col0), or a box whose pixels equal the clean
ones, gives the cached clean logits exactly, so its effect is exactly 0.
:func:`window_boxes` and :func:`mask_boxes` give the boxes of sliding windows
and of masks (superpixels).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import operator
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from causal_ie.runtime import eval_mode

log = logging.getLogger(__name__)

CUT_AUTO = "auto"
# ops that recompute their patch from a region of their input map
_REGION_KINDS = ("window", "resample")
# `supported` needs an estimated speed-up of at least this for a one-pixel box
MIN_GAIN = 1.1
# The cost model that places the cut, in FLOP-equivalents of eager CPU convolution (measured with one
# thread on this project's 2-core machine, timm resnet18/densenet121 at 224 px: convolutions
# 120-230 GFLOP/s, BatchNorm 2.3 G elements/s, max pooling 0.1 G input elements/s):
# per activation element a memory-bound op (copy, BatchNorm, ReLU, add, cat) reads or writes,
ELEMENT_COST = 40.0
# and per output element and kernel tap of a pooling op.
POOL_COST = 400.0
# FLOP-equivalents of the Python work per item and region copy (a few microseconds)
ITEM_COST = 2e5
# plans estimated within this share of the cheapest count as equal (the earliest cut wins)
COST_TOLERANCE = 0.03
# default bound on the cached clean maps of all images, in bytes
CACHE_LIMIT = 4 * 2**30
# clean images per clean forward (bounds the memory of the one-off clean pass)
CLEAN_BATCH = 16


# ---------------------------------------------------------------- tracing and per-node rules


class _Tracer(fx.Tracer):
    """Symbolic tracer keeping timm's non-traceable modules and functions as leaves."""

    def __init__(self) -> None:
        try:
            from timm.layers import get_notrace_functions, get_notrace_modules

            functions, modules = tuple(get_notrace_functions()), tuple(get_notrace_modules())
        except ImportError:  # pragma: no cover - timm is a dependency
            functions, modules = (), ()
        super().__init__(autowrap_functions=functions)
        self.leaf_types = modules

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        if _pointwise_module(m):  # e.g. timm's LayerNorm2d, whose permutes would look global
            return True
        return super().is_leaf_module(m, module_qualified_name)


@dataclass(frozen=True)
class _Window:
    """A sliding-window op: conv or pooling. ``same``: timm's dynamic 'same' padding."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    padding: tuple[int, int]
    same: bool
    ceil_mode: bool
    pad_value: float
    overhang_ok: bool  # windows reaching past the padding are fine (max pooling: -inf)
    flops: float  # cost per output element: 2 * in_channels / groups * kh * kw for convs, POOL_COST * kh * kw for pools
    apply: Callable[[Tensor], Tensor]  # the op with no padding on an exact region

    def pads(self, size: int, axis: int) -> tuple[int, int]:
        k, s, d = self.kernel[axis], self.stride[axis], self.dilation[axis]
        if self.same:
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            return total // 2, total - total // 2
        return self.padding[axis], self.padding[axis]


@dataclass(frozen=True)
class _Resample:
    """``F.interpolate`` of a 4-d map: linear and separable in rows and columns for every mode, so
    it is ``A_rows @ x @ A_cols.T`` with weight matrices read off the op itself (:meth:`matrix`)."""

    size: Any
    scale_factor: Any
    mode: str
    align_corners: bool | None
    recompute_scale_factor: bool | None
    antialias: bool

    def matrix(self, n_in: int, axis: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The weights [n_out, n_in] of one axis: the op applied to an identity whose other axis it
        leaves alone (same size, scale 1)."""
        eye = torch.eye(n_in, dtype=dtype, device=device)[None, None]
        size = scale = None
        if self.size is not None:
            n_out = _pair(self.size)[axis]
            size = (n_out, n_in) if axis == 0 else (n_in, n_out)
        else:
            factor = self.scale_factor
            factor = (float(factor), float(factor)) if isinstance(factor, int | float) else tuple(map(float, factor))
            scale = (factor[0], 1.0) if axis == 0 else (1.0, factor[1])
        out = F.interpolate(eye, size=size, scale_factor=scale, mode=self.mode, align_corners=self.align_corners,
                            recompute_scale_factor=self.recompute_scale_factor, antialias=self.antialias)[0, 0]
        return out if axis == 0 else out.T.contiguous()


_RESAMPLE_MODES = {"nearest", "nearest-exact", "bilinear", "bicubic", "area"}


def _resample_op(node: fx.Node) -> _Resample | str:
    """The resampling of an ``F.interpolate`` node, or why it has none."""
    names = ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")
    defaults = (None, None, None, "nearest", None, None, False)
    values = dict(zip(names, defaults))
    values.update(zip(names, node.args))
    values.update(node.kwargs)
    if any(isinstance(v, fx.Node) for k, v in values.items() if k != "input") or any(
        isinstance(v, fx.Node) for v in values["size"] or () if isinstance(values["size"], tuple | list)
    ):
        return "interpolate with a size computed at run time"
    if values["mode"] not in _RESAMPLE_MODES:
        return f"interpolate mode={values['mode']!r} (a 4-d map needs one of {sorted(_RESAMPLE_MODES)})"
    return _Resample(values["size"], values["scale_factor"], values["mode"], values["align_corners"],
                     values["recompute_scale_factor"], bool(values["antialias"]))


@dataclass
class _Op:
    """How one graph node treats a changed box."""

    kind: str  # input | const | pointwise | union | window | resample | meta | global
    what: str  # for messages: "backbone.layer1.0.conv1 (Conv2d)"
    acts: tuple[str, ...] = ()  # names of the input-dependent args
    window: _Window | None = None
    resample: _Resample | None = None
    why: str = ""  # global ops: why there is no rule
    linear_macs: int = 0  # nn.Linear: in_features * out_features

    @property
    def pad_value(self) -> float:
        """What the border of the map a region op reads holds (resampling reads inside the map only)."""
        return self.window.pad_value if self.window is not None else 0.0


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


@functools.cache
def _timm_types(*names: str) -> tuple[type, ...]:
    """timm classes by dotted name, skipping those this timm version lacks."""
    import importlib

    found = []
    for name in names:
        module, _, attr = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


_POINTWISE_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
    nn.LogSigmoid, nn.Tanhshrink, nn.Threshold, nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_POINTWISE_FUNCTIONS = {
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.leaky_relu_, F.elu, F.elu_, F.selu, F.celu, F.gelu, F.silu,
    F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.hardtanh_, F.softplus, F.sigmoid, F.tanh,
    torch.relu, torch.relu_, torch.sigmoid, torch.sigmoid_, torch.tanh, torch.tanh_, torch.clamp,
    torch.clamp_, torch.clip, torch.exp, torch.abs, torch.neg, operator.neg, operator.pos,
}
_ARITHMETIC_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
    operator.imul, operator.itruediv, torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply,
    torch.div, torch.true_divide, torch.maximum, torch.minimum,
}
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
_POINTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clamp_min", "clamp_min_",
    "clamp_max", "clamp_max_", "clip", "clip_", "neg", "neg_", "abs", "abs_", "exp", "exp_", "contiguous",
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum",
}
_META_METHODS = {"size", "dim"}
_META_ATTRS = {"shape", "ndim", "dtype"}
_INPLACE_FUNCTIONS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, F.relu_, F.leaky_relu_, F.elu_,
    F.hardtanh_, torch.relu_, torch.sigmoid_, torch.tanh_, torch.clamp_,
}


def _pointwise_module(m: nn.Module) -> bool:
    """Modules acting on each pixel on its own (in eval mode)."""
    if isinstance(m, _POINTWISE_MODULES + _timm_types(
        "timm.layers.activations.Swish", "timm.layers.activations.Mish", "timm.layers.activations.Sigmoid",
        "timm.layers.activations.Tanh", "timm.layers.activations.HardSwish",
        "timm.layers.activations.HardSigmoid", "timm.layers.activations.HardMish",
        "timm.layers.activations.GELU", "timm.layers.activations.GELUTanh",
        "timm.layers.activations.QuickGELU", "timm.layers.norm.LayerNorm2d",
    )):
        return True
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        if not (m.track_running_stats and m.running_mean is not None):
            return False  # batch statistics: mixes the whole map
        if type(m).forward is nn.modules.batchnorm._BatchNorm.forward:
            return True
        # timm's BatchNormAct2d: batch norm, drop, act
        drop, act = getattr(m, "drop", None), getattr(m, "act", None)
        norm_act = _timm_types("timm.layers.norm_act.BatchNormAct2d")
        return bool(norm_act) and isinstance(m, norm_act) and all(
            sub is None or _pointwise_module(sub) for sub in (drop, act)
        )
    if isinstance(m, _timm_types("timm.layers.norm_act.FrozenBatchNormAct2d")):
        return all(_pointwise_module(sub) for sub in (m.drop, m.act))
    return False


def _window_module(m: nn.Module) -> _Window | str:
    """The window geometry of a conv/pool module, or why it has none."""
    conv_same = _timm_types("timm.layers.conv2d_same.Conv2dSame")
    if isinstance(m, nn.Conv2d) and (type(m).forward is nn.Conv2d.forward or (conv_same and type(m) in conv_same)):
        if m.padding_mode != "zeros":
            return f"padding_mode={m.padding_mode!r}"
        same = bool(conv_same) and type(m) in conv_same
        if m.padding == "same":
            if any(s != 1 for s in m.stride):
                return "padding='same' with stride"
            padding, same = (0, 0), True
        elif m.padding == "valid":
            padding = (0, 0)
        else:
            padding = _pair(m.padding)
        return _Window(
            kernel=_pair(m.kernel_size), stride=_pair(m.stride), dilation=_pair(m.dilation), padding=padding,
            same=same, ceil_mode=False, pad_value=0.0, overhang_ok=False,
            flops=2 * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1],
            apply=lambda x, m=m: F.conv2d(x, m.weight, m.bias, m.stride, 0, m.dilation, m.groups),
        )
    if type(m) is nn.MaxPool2d:
        if m.return_indices:
            return "return_indices=True"
        k, s = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size)
        d = _pair(m.dilation)
        return _Window(
            kernel=k, stride=s, dilation=d, padding=_pair(m.padding), same=False, ceil_mode=bool(m.ceil_mode),
            pad_value=-math.inf, overhang_ok=True, flops=POOL_COST * k[0] * k[1],
            apply=lambda x, k=k, s=s, d=d: F.max_pool2d(x, k, s, 0, d),
        )
    if type(m) is nn.AvgPool2d:
        k, s = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size)
        padding = _pair(m.padding)
        if m.divisor_override is not None:
            return "divisor_override"
        if any(padding) and not m.count_include_pad:
            return "count_include_pad=False with padding (border windows have other divisors)"
        return _Window(
            kernel=k, stride=s, dilation=(1, 1), padding=padding, same=False, ceil_mode=bool(m.ceil_mode),
            pad_value=0.0, overhang_ok=False, flops=POOL_COST * k[0] * k[1],
            apply=lambda x, k=k, s=s: F.avg_pool2d(x, k, s, 0),
        )
    return f"no incremental rule for {type(m).__name__}"


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, kind = list(stack.values())[-1]
    kind_name = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    return f"{path} ({kind_name.rsplit('.', 1)[-1]})"


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(modules[node.target]).__name__})"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    where = _module_path(node)
    op = "method" if node.op == "call_method" else "function"
    return f"{where + ': ' if where else ''}{op} {target} (node {node.name})"


def _dims_arg(node: fx.Node) -> Any:
    return node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)


def _is_inplace(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return bool(getattr(modules[node.target], "inplace", False))
    if node.op == "call_method":
        return isinstance(node.target, str) and node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_function":
        return node.target in _INPLACE_FUNCTIONS or node.kwargs.get("inplace") is True
    return False


def _classify(node: fx.Node, modules: dict[str, nn.Module], dependent: set[fx.Node], meta: set[fx.Node]) -> _Op:
    what = _describe(node, modules) if node.op in ("call_module", "call_function", "call_method") else node.name
    if node.op == "placeholder":
        return _Op("input", node.name)
    if node not in dependent:
        return _Op("const", what)
    acts = tuple(n.name for n in node.all_input_nodes if n in dependent and n not in meta)
    if node.op == "output":
        return _Op("global", "output", acts)
    if not acts:  # only shapes of activations: ints that follow the batch size
        return _Op("meta", what)
    if node.op == "call_module":
        m = modules[node.target]
        if _pointwise_module(m):
            return _Op("pointwise", what, acts)
        window = _window_module(m)
        if isinstance(window, _Window):
            return _Op("window", what, acts, window=window)
        linear_macs = m.in_features * m.out_features if isinstance(m, nn.Linear) else 0
        return _Op("global", what, acts, why=window, linear_macs=linear_macs)
    if node.op == "call_method" and node.target in _META_METHODS:
        return _Op("meta", what, acts)
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1 and node.args[1] in _META_ATTRS:
        return _Op("meta", what, acts)
    if node.op == "call_function" and node.target in _CAT_FUNCTIONS:
        dim = _dims_arg(node)
        if dim in (1, -3):
            return _Op("union", what, acts)
        return _Op("global", what, acts, why=f"cat along dim {dim}")
    arithmetic = (node.op == "call_function" and node.target in _ARITHMETIC_FUNCTIONS) or (
        node.op == "call_method" and node.target in _POINTWISE_METHODS
    )
    if arithmetic or (node.op == "call_function" and node.target in _POINTWISE_FUNCTIONS):
        return _Op("pointwise" if len(acts) == 1 else "union", what, acts)
    if node.op == "call_function" and node.target is F.interpolate and len(acts) == 1:
        resample = _resample_op(node)
        if isinstance(resample, _Resample):
            return _Op("resample", what, acts, resample=resample)
        return _Op("global", what, acts, why=resample)
    if node.op == "call_function" and node.target in (F.dropout, F.dropout2d):
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        if training is False:
            return _Op("pointwise", what, acts)
    why = "no incremental rule"
    if node.op == "call_method" and node.target in ("mean", "sum", "amax", "max", "std", "var", "norm"):
        why = f"reduces over dims {_dims_arg(node)}: mixes the whole map"
    elif node.op in ("call_function", "call_method") and getattr(node.target, "__name__", node.target) in (
        "adaptive_avg_pool2d", "adaptive_max_pool2d", "flatten", "view", "reshape", "permute", "transpose",
        "interpolate", "softmax", "matmul", "bmm", "scaled_dot_product_attention",
    ):
        why = "reshapes or mixes space"
    return _Op("global", what, acts, why=why)


@dataclass
class _Analysis:
    """The traced graph of a model and each node's rule (independent of the input size)."""

    graph: fx.Graph | None
    nodes: list[fx.Node] = field(default_factory=list)
    ops: dict[str, _Op] = field(default_factory=dict)
    error: str = ""  # why the model cannot run incrementally at all
    logged: set[str] = field(default_factory=set)


_ANALYSES: weakref.WeakKeyDictionary[nn.Module, dict[tuple, _Analysis]] = weakref.WeakKeyDictionary()


def _analyse(model: nn.Module) -> _Analysis:
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    key = None if first is None else (first.device, first.dtype)
    per_model = _ANALYSES.setdefault(model, {})
    if key not in per_model:
        per_model[key] = _build_analysis(model)
    return per_model[key]


def _build_analysis(model: nn.Module) -> _Analysis:
    try:
        with eval_mode(model):  # control flow on self.training fixed to evaluation
            graph = _Tracer().trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure means plain forwards
        return _Analysis(None, error=f"torch.fx cannot trace {type(model).__name__} ({type(err).__name__}: {err})")
    modules = dict(model.named_modules())
    nodes = list(graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return _Analysis(graph, nodes, error=f"{type(model).__name__}.forward takes {len(placeholders)} inputs, not one")
    dependent: set[fx.Node] = set(placeholders)
    meta: set[fx.Node] = set()
    ops: dict[str, _Op] = {}
    for node in nodes:
        if node.op != "placeholder" and any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
        op = _classify(node, modules, dependent, meta)
        if op.kind == "meta":
            meta.add(node)
        ops[node.name] = op
    analysis = _Analysis(graph, nodes, ops)
    # an in-place op whose input is read again later would make the cached clean values stale
    order = {n: i for i, n in enumerate(nodes)}
    for node in nodes:
        if node in dependent and _is_inplace(node, modules):
            target = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            later = [u for u in target.users if order[u] > order[node]] if target is not None else []
            if later:
                analysis.error = (
                    f"{ops[node.name].what} changes {target.name} in place, which "
                    f"{later[0].name} reads afterwards"
                )
    return analysis


# ---------------------------------------------------------------- geometry of one plan


def _ceil_div(a: Tensor, b: int) -> Tensor:
    return -((-a) // b)


@dataclass
class _Geometry:
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
class _ResampleAxis:
    """One axis of a resampling: output i is ``weights[i] @ input``, whose non-zero weights lie in
    input rows ``first[i]..last[i]`` (both non-decreasing in i for every mode of ``F.interpolate``)."""

    weights: Tensor  # [n_out, n_in]
    first: Tensor  # [n_out] long, on the CPU
    last: Tensor

    @classmethod
    def of(cls, weights: Tensor) -> _ResampleAxis:
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


def _resample_geometry(axes: tuple[_ResampleAxis, ...], arg: _Geometry, out_size: tuple[int, int]) -> _Geometry | str:
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
    return _Geometry(tuple(sizes), tuple(starts), tuple(los), tuple(his), out_size, tuple(rstarts), tuple(rlens))


@dataclass
class _Plan:
    box: tuple[int, int]
    threshold: float
    modes: dict[str, str]  # inc | full | const | meta
    geometry: dict[str, _Geometry]
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


# ---------------------------------------------------------------- the patched values


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


# ---------------------------------------------------------------- the engine


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
        self.analysis = _analyse(model)
        self._by_name = {n.name: n for n in self.analysis.nodes}
        self.reason = self.analysis.error
        self._modules = dict(model.named_modules())
        self._consts: dict[str, Any] = {}
        self._shapes: dict[str, tuple[int, ...] | None] = {}
        self._caches: dict[tuple[str, float], Tensor] = {}
        self._margins: dict[tuple[str, float], list[int]] = {}  # cache key -> padding top, bottom, left, right
        self._plans: dict[tuple[int, int], _Plan] = {}
        self._resample: dict[str, tuple[_ResampleAxis, ...]] = {}  # resampling node -> weights per axis
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

    def _spatial(self, name: str) -> tuple[int, int] | None:
        shape = self._shapes.get(name)
        return (shape[-2], shape[-1]) if shape is not None and len(shape) == 3 else None

    def _geometry(self, box: tuple[int, int]) -> tuple[dict[str, _Geometry], dict[str, str]]:
        """Geometry of every node the changed box can be followed through, and for the first nodes
        where it cannot, why."""
        ops, geometry, stops = self.analysis.ops, {}, {}
        height, width = self.image_size
        for node in self.analysis.nodes:
            op = ops[node.name]
            size = self._spatial(node.name)
            if op.kind == "input":
                lo = (torch.arange(height - box[0] + 1), torch.arange(width - box[1] + 1))
                hi = (lo[0] + box[0], lo[1] + box[1])
                geometry[node.name] = _Geometry(box, lo, lo, hi, (height, width))
                continue
            if op.kind not in ("pointwise", "union", "window", "resample"):
                if op.kind == "global" and any(a in geometry for a in op.acts):
                    stops[node.name] = op.why or "no incremental rule"
                continue
            if not all(a in geometry for a in op.acts):
                continue
            args = [geometry[a] for a in op.acts]
            if size is None or (op.kind not in _REGION_KINDS and any(g.map_size != size for g in args)):
                stops[node.name] = "changes the map's shape"
                continue
            if op.kind == "pointwise":
                if not self._constants_pointwise(node):
                    stops[node.name] = "a constant argument varies over space"
                    continue
                geometry[node.name] = args[0]
            elif op.kind == "union":
                lo = tuple(torch.stack([g.lo[a] for g in args]).amin(0) for a in (0, 1))
                hi = tuple(torch.stack([g.hi[a] for g in args]).amax(0) for a in (0, 1))
                sizes = tuple(max(1, int((hi[a] - lo[a]).max())) for a in (0, 1))
                start = tuple(lo[a].clamp(max=size[a] - sizes[a]) for a in (0, 1))
                geometry[node.name] = _Geometry(sizes, start, lo, hi, size)
            else:
                if op.kind == "window":
                    made = self._window_geometry(op.window, args[0], size)
                else:
                    made = _resample_geometry(self._resample_axes(node.name, op.resample, args[0].map_size), args[0], size)
                if isinstance(made, str):
                    stops[node.name] = made
                else:
                    geometry[node.name] = made
        return geometry, stops

    def _resample_axes(self, name: str, resample: _Resample, in_size: tuple[int, int]) -> tuple[_ResampleAxis, ...]:
        """The weight matrices of a resampling node per axis (computed once)."""
        if name not in self._resample:
            dtype, device = self.clean_inputs.dtype, self.clean_inputs.device
            self._resample[name] = tuple(
                _ResampleAxis.of(resample.matrix(in_size[axis], axis, dtype, device)) for axis in (0, 1)
            )
        return self._resample[name]

    def _constants_pointwise(self, node: fx.Node) -> bool:
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

    @staticmethod
    def _window_geometry(window: _Window, arg: _Geometry, out_size: tuple[int, int]) -> _Geometry | str:
        sizes, starts, los, his, rstarts, rlens = [], [], [], [], [], []
        for axis in (0, 1):
            n_in, n_out = arg.map_size[axis], out_size[axis]
            k, s, d = window.kernel[axis], window.stride[axis], window.dilation[axis]
            pb, pe = window.pads(n_in, axis)
            e = d * (k - 1)
            floor_out = (n_in + pb + pe - e - 1) // s + 1
            if not (n_out == floor_out or (window.ceil_mode and n_out == floor_out + 1)):
                return f"output size {n_out} does not follow from the window geometry"
            lo = _ceil_div(arg.lo[axis] + pb - e, s).clamp(min=0, max=n_out - 1)
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
        return _Geometry(tuple(sizes), tuple(starts), tuple(los), tuple(his), out_size, tuple(rstarts), tuple(rlens))

    def _modes(self, geometry: dict[str, _Geometry], threshold: float) -> dict[str, str]:
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

    def _cost(self, modes: dict[str, str], geometry: dict[str, _Geometry]) -> float:
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
            elif op.kind == "resample" and node.name in self._resample:  # one pass per axis over its taps
                total += 2 * numel * sum(axis.taps for axis in self._resample[node.name])
            total += 2 * op.linear_macs
            total += ELEMENT_COST * (numel + sum(math.prod(self._shapes[a]) for a in ins))
        return total

    def _first_stop(self, stops: dict[str, str], modes: dict[str, str]) -> str:
        """The first op the changed box cannot be followed through, with why."""
        for node in self.analysis.nodes:
            if node.name in stops and all(modes.get(a) == "inc" for a in self.analysis.ops[node.name].acts):
                return f"{self.analysis.ops[node.name].what}: {stops[node.name]}"
        return ""

    def _check_gain(self) -> None:
        """The model is worth it if a one-pixel box saves at least :data:`MIN_GAIN`."""
        geometry, stops = self._geometry((1, 1))
        modes = self._modes(geometry, 1.0)
        full = self._cost(self._modes(geometry, -1.0), geometry)
        best = self._cost(modes, geometry)
        gain = full / best if best > 0 else 1.0
        if gain < MIN_GAIN:
            stop = self._first_stop(stops, modes) or "no spatially local ops before the output"
            self.reason = (
                f"global mixing early in the network at {stop}; even a one-pixel change would save "
                f"only {100 * (1 - 1 / gain):.0f}% of the work"
            )

    def _plan(self, box: tuple[int, int]) -> _Plan:
        for key in sorted(self._plans):  # a plan for a larger box serves smaller ones
            if key[0] >= box[0] and key[1] >= box[1] and key[0] * key[1] <= 2 * box[0] * box[1]:
                return self._plans[key]
        geometry, stops = self._geometry(box)
        no_inc = self._modes(geometry, -1.0)
        full_cost = self._cost(no_inc, geometry)
        if self.cut_fraction == CUT_AUTO:
            scored = []
            for t in sorted({g.fraction for g in geometry.values()}):
                modes = self._modes(geometry, t)
                scored.append((self._cost(modes, geometry), t, modes))
            # among plans within COST_TOLERANCE of the cheapest, the earliest cut (less cached memory,
            # fewer small ops); then the rest by cost
            near = min(c for c, _, _ in scored) * (1 + COST_TOLERANCE)
            scored = sorted((s for s in scored if s[0] <= near), key=lambda s: s[1]) + sorted(
                (s for s in scored if s[0] > near), key=lambda s: s[0]
            )
            plan = None
            for cost, threshold, modes in scored:  # the cheapest plan whose caches fit the limit
                plan = self._build_plan(box, threshold, modes, geometry, cost, full_cost, stops)
                if self.cache_limit is None or self._plan_bytes(plan) <= self.cache_limit:
                    break
            else:
                plan = min((self._build_plan(box, t, m, geometry, c, full_cost, stops) for c, t, m in scored),
                           key=self._plan_bytes)
        else:
            threshold = float(self.cut_fraction)
            modes = self._modes(geometry, threshold)
            plan = self._build_plan(box, threshold, modes, geometry, self._cost(modes, geometry), full_cost, stops)
        self._plans[box] = plan
        if plan.plain:
            log.info("incremental inference: a %dx%d box saves nothing on %s (%s); plain forwards",
                     box[0], box[1], type(self.model).__name__, plan.cut)
        return plan

    def _build_plan(
        self, box: tuple[int, int], threshold: float, modes: dict[str, str], geometry: dict[str, _Geometry],
        cost: float, full_cost: float, stops: dict[str, str],
    ) -> _Plan:
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
            if op.kind in _REGION_KINDS:
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
        cut = self._describe_cut(inc_nodes, full_nodes, stops, threshold)
        plain = cost >= full_cost or len(inc_nodes) <= 1
        return _Plan(box, threshold, modes, geometry, caches, window_cache, expand, materialize, cost, full_cost,
                     cut, plain, last_use)

    def _describe_cut(
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

    def _ensure_caches(self, plan: _Plan) -> None:
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

    def _plan_bytes(self, plan: _Plan) -> int:
        """Memory of the clean maps ``plan`` caches, for all clean images."""
        per_image = sum(
            self._shapes[name][0] * (self._shapes[name][1] + m[0] + m[1]) * (self._shapes[name][2] + m[2] + m[3])
            for (name, _), m in plan.caches.items()
        )
        return per_image * self.clean_inputs.shape[0] * self.clean_inputs.element_size()

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
            "cache_bytes_per_image": self._plan_bytes(plan) // self.clean_inputs.shape[0],
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
            index = image_idx.to(self.clean_inputs.device, torch.long)
            boxes = changed_boxes(perturbed, self.clean_inputs.index_select(0, index).to(perturbed.device))
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

    def _run(self, plan: _Plan, perturbed: Tensor, index: Tensor, boxes: Tensor) -> Tensor:
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
        self, name: str, g: _Geometry, region: Tensor, r0: list[int], c0: list[int], rr: list[int], rc: list[int]
    ) -> Tensor:
        """Outputs [B, C, *g.size] at (r0[b], c0[b]) of a resampling, from the input regions at (rr[b],
        rc[b]): each item's block of the row and column weights, multiplied in."""
        blocks = []
        for axis, (out0, in0) in enumerate(((r0, rr), (c0, rc))):
            weights = self._resample[name][axis].weights
            device = weights.device
            outs = torch.tensor(out0, device=device)[:, None] + torch.arange(g.size[axis], device=device)
            ins = torch.tensor(in0, device=device)[:, None] + torch.arange(g.region_len[axis], device=device)
            blocks.append(weights[outs[:, :, None], ins[:, None, :]].unsqueeze(1).to(region.dtype))
        rows, cols = blocks  # [B, 1, h, rh], [B, 1, w, rw]
        return (rows @ region @ cols.transpose(-1, -2)).contiguous(memory_format=self.memory_format)

    def _node(self, name: str) -> fx.Node:
        return self._by_name[name]

    def _compile_suffix(self, plan: _Plan) -> None:
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

    def _meta_value(self, plan: _Plan, n: fx.Node, env: dict[str, Any], batch: int) -> Any:
        """Shape-only uses of a patched map see the full map's shape."""
        if n.name in self._consts:
            return self._consts[n.name]
        value = env[n.name]
        if isinstance(value, _Patch):
            shape = self._shapes[n.name]
            return torch.empty((batch, *shape), device="meta", dtype=value.data.dtype)
        return value

    def _cache_key(self, plan: _Plan, name: str) -> tuple[str, float]:
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
        self, plan: _Plan, perturbed: Tensor, images: list[int], boxes: Tensor, probe_r: Tensor, probe_c: Tensor
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


# ---------------------------------------------------------------- helpers for the engine


def incremental_support(model: nn.Module, image_shape: tuple[int, int, int]) -> tuple[bool, str]:
    """Whether ``model`` runs incrementally on images of shape (C, H, W), and if not why (one forward
    of a zero image on the model's device)."""
    param = next(itertools.chain(model.parameters(), model.buffers()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    fwd = IncrementalForward(model, torch.zeros((1, *image_shape), device=device, dtype=dtype), verify=0)
    return fwd.supported, fwd.reason


def changed_boxes(perturbed: Tensor, clean: Tensor) -> Tensor:
    """Bounding boxes [B, 4] of the pixels (any channel) where ``perturbed`` [B, C, H, W] differs from
    ``clean`` (same shape); (0, 0, 0, 0) where nothing changed."""
    return mask_boxes((perturbed != clean).any(dim=1))


def incremental_forward(
    model: nn.Module, inputs: Tensor, **options: Any
) -> Callable[[Tensor, Tensor], Tensor]:
    """The engine's ``BatchForward`` (perturbed batch, image index -> logits) running incrementally on
    the clean ``inputs``; boxes come from :func:`changed_boxes`, so any pixel-space region kind works
    unchanged (``options`` go to :class:`IncrementalForward`)."""
    fwd = IncrementalForward(model, inputs, **options)
    return lambda batch, image_idx: fwd(batch, image_idx)


def window_boxes(grid: Any, window_idx: Tensor) -> Tensor:
    """Boxes [B, 4] (row0, row1, col0, col1) of windows ``window_idx`` of a
    :class:`~causal_ie.interventions.windows.WindowGrid` (clipped at the image border)."""
    height, width = grid.image_size
    n_cols = grid.shape[1]
    idx = window_idx.to("cpu", torch.long)
    top = (idx // n_cols) * grid.stride[0]
    left = (idx % n_cols) * grid.stride[1]
    return torch.stack(
        [top, (top + grid.window[0]).clamp(max=height), left, (left + grid.window[1]).clamp(max=width)], dim=1
    )


def mask_boxes(masks: Tensor) -> Tensor:
    """Bounding boxes [..., 4] (row0, row1, col0, col1) of boolean masks [..., H, W]; empty masks get
    (0, 0, 0, 0)."""
    masks = masks.bool()
    rows, cols = masks.any(dim=-1), masks.any(dim=-2)
    height, width = masks.shape[-2:]

    def span(hit: Tensor, size: int) -> tuple[Tensor, Tensor]:
        ar = torch.arange(size, device=hit.device)
        first = torch.where(hit, ar, size).amin(dim=-1)
        last = torch.where(hit, ar + 1, 0).amax(dim=-1)
        empty = ~hit.any(dim=-1)
        return first.masked_fill(empty, 0), last.masked_fill(empty, 0)

    r0, r1 = span(rows, height)
    c0, c1 = span(cols, width)
    return torch.stack([r0, r1, c0, c1], dim=-1).cpu()

