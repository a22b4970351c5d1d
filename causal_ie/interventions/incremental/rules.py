"""Tracing a model with torch.fx and the rule of every node: how a changed box moves through it.

*window* ops (convolutions, max and average pooling) grow the box by their context; *resample*
ops (``F.interpolate``) map it to the outputs whose weights reach into it; *pointwise* ops keep
it; *union* ops (two branches combined, channel ``cat``) take the union; *meta* nodes read only
shapes; anything else is *global* (everything changes from there) and says why.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from causal_ie.runtime import eval_mode

# ops that recompute their patch from a region of their input map
REGION_KINDS = ("window", "resample")
# the planner's cost of one kernel tap of a pooling op per output element, in FLOP-equivalents
# of eager CPU convolution (max pooling ran at 0.1 G input elements/s against 120-230 GFLOP/s
# convolutions, one thread, timm resnet18/densenet121 at 224 px)
POOL_COST = 400.0


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
class Window:
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
class Resample:
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


def _resample_op(node: fx.Node) -> Resample | str:
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
    return Resample(values["size"], values["scale_factor"], values["mode"], values["align_corners"],
                     values["recompute_scale_factor"], bool(values["antialias"]))


@dataclass
class Op:
    """How one graph node treats a changed box."""

    kind: str  # input | const | pointwise | union | window | resample | meta | global
    what: str  # for messages: "backbone.layer1.0.conv1 (Conv2d)"
    acts: tuple[str, ...] = ()  # names of the input-dependent args
    window: Window | None = None
    resample: Resample | None = None
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


def _window_module(m: nn.Module) -> Window | str:
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
        return Window(
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
        return Window(
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
        return Window(
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


def _classify(node: fx.Node, modules: dict[str, nn.Module], dependent: set[fx.Node], meta: set[fx.Node]) -> Op:
    what = _describe(node, modules) if node.op in ("call_module", "call_function", "call_method") else node.name
    if node.op == "placeholder":
        return Op("input", node.name)
    if node not in dependent:
        return Op("const", what)
    acts = tuple(n.name for n in node.all_input_nodes if n in dependent and n not in meta)
    if node.op == "output":
        return Op("global", "output", acts)
    if not acts:  # only shapes of activations: ints that follow the batch size
        return Op("meta", what)
    if node.op == "call_module":
        m = modules[node.target]
        if _pointwise_module(m):
            return Op("pointwise", what, acts)
        window = _window_module(m)
        if isinstance(window, Window):
            return Op("window", what, acts, window=window)
        linear_macs = m.in_features * m.out_features if isinstance(m, nn.Linear) else 0
        return Op("global", what, acts, why=window, linear_macs=linear_macs)
    if node.op == "call_method" and node.target in _META_METHODS:
        return Op("meta", what, acts)
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1 and node.args[1] in _META_ATTRS:
        return Op("meta", what, acts)
    if node.op == "call_function" and node.target in _CAT_FUNCTIONS:
        dim = _dims_arg(node)
        if dim in (1, -3):
            return Op("union", what, acts)
        return Op("global", what, acts, why=f"cat along dim {dim}")
    arithmetic = (node.op == "call_function" and node.target in _ARITHMETIC_FUNCTIONS) or (
        node.op == "call_method" and node.target in _POINTWISE_METHODS
    )
    if arithmetic or (node.op == "call_function" and node.target in _POINTWISE_FUNCTIONS):
        return Op("pointwise" if len(acts) == 1 else "union", what, acts)
    if node.op == "call_function" and node.target is F.interpolate and len(acts) == 1:
        resample = _resample_op(node)
        if isinstance(resample, Resample):
            return Op("resample", what, acts, resample=resample)
        return Op("global", what, acts, why=resample)
    if node.op == "call_function" and node.target in (F.dropout, F.dropout2d):
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        if training is False:
            return Op("pointwise", what, acts)
    why = "no incremental rule"
    if node.op == "call_method" and node.target in ("mean", "sum", "amax", "max", "std", "var", "norm"):
        why = f"reduces over dims {_dims_arg(node)}: mixes the whole map"
    elif node.op in ("call_function", "call_method") and getattr(node.target, "__name__", node.target) in (
        "adaptive_avg_pool2d", "adaptive_max_pool2d", "flatten", "view", "reshape", "permute", "transpose",
        "interpolate", "softmax", "matmul", "bmm", "scaled_dot_product_attention",
    ):
        why = "reshapes or mixes space"
    return Op("global", what, acts, why=why)


@dataclass
class Analysis:
    """The traced graph of a model and each node's rule (independent of the input size)."""

    graph: fx.Graph | None
    nodes: list[fx.Node] = field(default_factory=list)
    ops: dict[str, Op] = field(default_factory=dict)
    error: str = ""  # why the model cannot run incrementally at all
    logged: set[str] = field(default_factory=set)


_ANALYSES: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Analysis]] = weakref.WeakKeyDictionary()


def analyse(model: nn.Module) -> Analysis:
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    key = None if first is None else (first.device, first.dtype)
    per_model = _ANALYSES.setdefault(model, {})
    if key not in per_model:
        per_model[key] = _build_analysis(model)
    return per_model[key]


def _build_analysis(model: nn.Module) -> Analysis:
    try:
        with eval_mode(model):  # control flow on self.training fixed to evaluation
            graph = _Tracer().trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure means plain forwards
        return Analysis(None, error=f"torch.fx cannot trace {type(model).__name__} ({type(err).__name__}: {err})")
    modules = dict(model.named_modules())
    nodes = list(graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return Analysis(graph, nodes, error=f"{type(model).__name__}.forward takes {len(placeholders)} inputs, not one")
    dependent: set[fx.Node] = set(placeholders)
    meta: set[fx.Node] = set()
    ops: dict[str, Op] = {}
    for node in nodes:
        if node.op != "placeholder" and any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
        op = _classify(node, modules, dependent, meta)
        if op.kind == "meta":
            meta.add(node)
        ops[node.name] = op
    analysis = Analysis(graph, nodes, ops)
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
