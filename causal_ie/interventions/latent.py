"""Latent CE: interventions on a feature map inside the network.

The network is cut at a layer into a *prefix* (image -> the layer's output A)
and a *suffix* (A -> logits) with ``torch.fx``. The prefix runs once per image;
each batch of interventions (a cell or a channel of A set to a baseline) only
runs the suffix. Values that the suffix needs from before the cut (skip
connections crossing it) are computed by the prefix too and carried along,
gathered per intervention from the image they belong to.

Where the interventions happen is a :class:`LatentSpace`: anything that
encodes images to a latent [N, C, h, w] plus per-image context, and decodes an
(intervened) latent back to logits. :class:`LatentSplit` is the one built here;
another space (e.g. an autoencoder's code: encode = encoder, decode = model o
decoder) plugs into :func:`latent_effect` through ``space=`` unchanged.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from causal_ie.interventions.baselines import Baseline
from causal_ie.interventions.engine import check_images, region_effects
from causal_ie.interventions.fast import compiled, engine_session, release
from causal_ie.interventions.spec import InterventionSpec
from causal_ie.interventions.windows import WindowGrid
from causal_ie.layers import backbone_of, find_layer, layer_suggestions
from causal_ie.runtime import eval_mode, to_model

LATENT_MODES = ("spatial", "channel")
LATENT_BASELINES = ("zero", "mean")
# mid-level layer per timm backbone class (names relative to the backbone); DenseNet-121
# after transition1 as in the paper's code
AUTO_LAYERS = {
    "DenseNet": "features.transition1",
    "ResNet": "layer2",
    "EfficientNet": "blocks.3",
}


class LatentSpace(Protocol):
    """Where latent interventions happen."""

    def encode(self, x: Tensor) -> tuple[Tensor, Any]:
        """Latent [N, C, h, w] of images ``x`` and the per-image context :meth:`decode` needs."""

    def decode(self, latent: Tensor, context: Any, image_idx: Tensor) -> Tensor:
        """Logits [B, K] of latents [B, C, h, w], latent b belonging to image ``image_idx[b]``."""


# ---------------------------------------------------------------- choosing the layer


def auto_layer(model: nn.Module) -> str:
    """A mid-level layer: :data:`AUTO_LAYERS` by backbone class, else the middle of timm's
    ``feature_info``."""
    backbone, prefix = backbone_of(model)
    names = dict(backbone.named_modules())
    layer = AUTO_LAYERS.get(type(backbone).__name__)
    if layer in names:
        return prefix + layer
    info = getattr(backbone, "feature_info", None)
    modules = [entry["module"] for entry in info] if info else []
    if modules:
        return prefix + modules[len(modules) // 2]
    raise ValueError(
        f"layer='auto' does not know {type(backbone).__name__}: pass the layer name, e.g. one of "
        f"{layer_suggestions(model)}"
    )


def resolve_layer(model: nn.Module, layer: str) -> str:
    """Qualified name of ``layer`` in ``model`` (``auto``: :func:`auto_layer`). Names may also be
    given relative to a Classifier's backbone. ValueError listing valid names otherwise."""
    if layer == "auto":
        return auto_layer(model)
    return find_layer(model, layer)[0]


# ---------------------------------------------------------------- the split


class _SplitTracer(fx.Tracer):
    """Symbolic tracer that remembers the node holding the output of module ``layer``.

    timm's non-traceable modules and functions are kept as leaves, as in timm's own
    fx feature extraction.
    """

    def __init__(self, layer: str):
        from timm.layers import get_notrace_functions, get_notrace_modules

        super().__init__(autowrap_functions=tuple(get_notrace_functions()))
        self.leaf_types = tuple(get_notrace_modules())
        self.layer = layer
        self.split_node: fx.Node | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):  # noqa: ANN001
        out = super().call_module(m, forward, args, kwargs)
        if self.path_of_module(m) == self.layer:
            if self.split_node is not None:
                raise ValueError(f"layer {self.layer!r} is called more than once: cut at a layer used once")
            if not isinstance(out, fx.Proxy):
                raise ValueError(f"layer {self.layer!r} does not return a single tensor: pick another layer")
            self.split_node = out.node
        return out


def _reachable(start: list[fx.Node], step: Callable[[fx.Node], list[fx.Node]]) -> set[fx.Node]:
    """Nodes reachable from ``start`` by following ``step`` (``start`` included)."""
    seen: set[fx.Node] = set()
    todo = list(start)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(step(n))
    return seen


def _descendants(node: fx.Node) -> set[fx.Node]:
    return _reachable(list(node.users), lambda n: list(n.users))


def _ancestors(nodes: list[fx.Node]) -> set[fx.Node]:
    return _reachable(nodes, lambda n: n.all_input_nodes)


class LatentSplit(nn.Module):
    """``model`` cut after module ``layer`` into ``prefix`` (x -> A, carried) and ``suffix``
    (A, *carried -> logits), with ``suffix(*prefix(x)) == model(x)``.

    Traced in eval mode: control flow on ``self.training`` (BatchNorm, dropout) is
    fixed to evaluation. ``carried`` are the values computed before the cut that
    the suffix still needs (skip connections across it); they must be tensors with
    one row per image.
    """

    def __init__(self, model: nn.Module, layer: str = "auto"):
        super().__init__()
        self.layer = resolve_layer(model, layer)
        tracer = _SplitTracer(self.layer)
        with eval_mode(model):
            graph = tracer.trace(model)
        if tracer.split_node is None:
            raise ValueError(f"layer {self.layer!r} is never called in {type(model).__name__}.forward")
        prefix_graph, suffix_graph, self.carried_names = _split_graph(graph, tracer.split_node, self.layer)
        self.prefix = fx.GraphModule(model, prefix_graph, class_name="Prefix")
        self.suffix = fx.GraphModule(model, suffix_graph, class_name="Suffix")

    def encode(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """The layer's activation for ``x`` and the carried values, once per image."""
        activation, *carried = self.prefix(x)
        for name, value in zip(self.carried_names, carried):
            if not isinstance(value, Tensor) or value.dim() == 0 or value.shape[0] != x.shape[0]:
                raise ValueError(
                    f"cutting at {self.layer!r}, the rest of the network needs {name!r} from before the cut, "
                    f"which is not a per-image tensor ({type(value).__name__}): pick a later layer"
                )
        if not isinstance(activation, Tensor):
            raise ValueError(f"layer {self.layer!r} does not output a tensor")
        return activation, tuple(carried)

    def decode(self, latent: Tensor, context: tuple[Tensor, ...], image_idx: Tensor) -> Tensor:
        """Logits of latents ``latent`` [B, ...], row b of image ``image_idx[b]``."""
        # index_select copies, so in-place ops of the suffix never touch the cached values
        return self.suffix(latent, *(value.index_select(0, image_idx) for value in context))

    def forward(self, x: Tensor) -> Tensor:
        latent, context = self.encode(x)
        return self.decode(latent, context, torch.arange(x.shape[0], device=latent.device))


def _split_graph(graph: fx.Graph, split: fx.Node, layer: str) -> tuple[fx.Graph, fx.Graph, list[str]]:
    """Prefix and suffix graphs of ``graph`` cut at node ``split``.

    Suffix = the nodes that depend on ``split`` (and the output). Its other inputs
    are either input-independent (parameters, constants: copied into the suffix)
    or computed from the input before the cut (carried from the prefix).
    """
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    after = _descendants(split)
    if output not in after:
        raise ValueError(f"the model's output does not depend on layer {layer!r}")
    input_dependent = set(placeholders)
    for node in graph.nodes:
        if any(arg in input_dependent for arg in node.all_input_nodes):
            input_dependent.add(node)

    carried: list[fx.Node] = []
    constants: set[fx.Node] = set()
    for node in graph.nodes:
        if node not in after:
            continue
        for arg in node.all_input_nodes:
            if arg in after or arg is split:
                continue
            if arg in input_dependent:
                if arg not in carried:
                    carried.append(arg)
            else:
                constants |= _ancestors([arg])

    prefix = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    needed = _ancestors([split, *carried])
    for node in graph.nodes:
        if node in needed or node.op == "placeholder":
            env[node] = prefix.node_copy(node, lambda n: env[n])
    prefix.output((env[split], *(env[n] for n in carried)))

    suffix = fx.Graph()
    env = {split: suffix.placeholder("activation")}
    for i, node in enumerate(carried):
        env[node] = suffix.placeholder(f"carried_{i}")
    for node in graph.nodes:
        if node in after or node in constants:
            env[node] = suffix.node_copy(node, lambda n: env[n])
    prefix.lint()
    suffix.lint()
    return prefix, suffix, [n.name for n in carried]


_SPLITS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, LatentSplit]] = weakref.WeakKeyDictionary()


def latent_split(model: nn.Module, layer: str = "auto") -> LatentSplit:
    """:class:`LatentSplit` of ``model`` at ``layer``, cached per model, layer, device and dtype
    (tracing a DenseNet takes a while; moving the model invalidates the copied buffers)."""
    name = resolve_layer(model, layer)
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    key = (name, None if first is None else (first.device, first.dtype))
    per_model = _SPLITS.setdefault(model, {})
    if key not in per_model:
        per_model[key] = LatentSplit(model, name)
    return per_model[key]


# ---------------------------------------------------------------- regions in the latent


class ChannelRegions:
    """Each channel of a latent [N, C, h, w] as one region (the whole channel set to the baseline)."""

    def __init__(self, channels: int):
        self.channels = channels

    def region_counts(self, n_images: int) -> list[int]:
        return [self.channels] * n_images

    def apply(
        self, inputs: Tensor, image_idx: Tensor, region_idx: Tensor, sample_idx: Tensor, baseline: Baseline
    ) -> Tensor:
        rows = torch.arange(inputs.shape[0], device=inputs.device)
        if baseline.value is not None:
            inputs[rows, region_idx] = baseline.value
        else:
            assert baseline.images is not None
            inputs[rows, region_idx] = baseline.images[image_idx, sample_idx, region_idx].to(inputs.dtype)
        return inputs

    def assemble(self, effects: Tensor) -> Tensor:
        return effects


def _check_latent_baseline(baseline: Any) -> None:
    """``zero``, ``mean`` (each channel's spatial mean, per image) or a float."""
    if isinstance(baseline, bool) or not (isinstance(baseline, int | float) or baseline in LATENT_BASELINES):
        raise ValueError(f"latent baseline must be one of {LATENT_BASELINES} or a float, got {baseline!r}")


def _latent_effects(
    model: nn.Module, x: Tensor, layer: str, mode: str, space: LatentSpace | None, spec: InterventionSpec
) -> tuple[Tensor, Tensor]:
    """Effects ([N, K, h, w] or [N, K, C]) and the latent activation [N, C, h, w]."""
    check_images(x.detach())
    if mode not in LATENT_MODES:
        raise ValueError(f"mode must be one of {LATENT_MODES}, got {mode!r}")
    _check_latent_baseline(spec.baseline)
    inputs = to_model(model, x)
    with eval_mode(model), engine_session(model, spec.engine, spec.differentiable):
        space = space if space is not None else latent_split(model, layer)
        latent, context = space.encode(inputs)
        if latent.dim() != 4:
            raise ValueError(
                f"latent interventions need a feature map [N, C, h, w], the layer gives shape {tuple(latent.shape)}"
            )
        if mode == "spatial":  # a cell is a 1 x 1 window through all channels
            regions = WindowGrid.create(tuple(latent.shape[-2:]), 1, 1)
        else:
            regions = ChannelRegions(latent.shape[1])

        def forward(batch: Tensor, image_idx: Tensor) -> Tensor:
            return space.decode(batch, context, image_idx)

        if spec.engine.compile and not spec.differentiable and isinstance(space, LatentSplit):
            suffix = compiled(space.suffix, spec.engine, batch=spec.forward_batch, owner=model,
                              key=("latent suffix", space.layer), what=f"{type(model).__name__} after {space.layer}")

            def forward(batch: Tensor, image_idx: Tensor) -> Tensor:  # noqa: F811 - the compiled suffix
                return suffix(batch, *(value.index_select(0, image_idx) for value in context))

        effects = region_effects(forward, latent, regions, spec.baseline_for(latent), spec)
    return release(regions.assemble(effects)), release(latent)


def latent_effect(
    model: nn.Module,
    x: Tensor,
    *,
    layer: str = "auto",
    mode: str = "spatial",
    space: LatentSpace | None = None,
    as_maps: bool = False,
    spec: InterventionSpec | None = None,
    **settings: Any,
) -> Tensor:
    """CE of interventions on the activation A of ``layer`` for images ``x`` [N, C, H, W].

    ``spatial``: one intervention per cell (i, j), all channels of the cell set to
    the baseline -> [N, K, h, w]. ``channel``: one per channel, the whole channel
    set -> [N, K, C_A]. The spec's ``baseline``: ``zero``, ``mean`` (the channel's
    spatial mean in that image) or a float. ``space`` replaces the fx split (``layer``
    is then ignored). ``spec`` and ``settings`` as in :func:`causal_ie.interventions.causal_effect`.

    ``as_maps``: maps [N, K, H, W] at the input's size instead (bilinear,
    align_corners=False): ``spatial`` cell effects upsampled; ``channel`` effects
    spread over space by where each channel is active, ``sum_c CE_c |A_c| / sum_c |A_c|``
    (0 where A is all zero), then upsampled: a channel's effect is attributed to the
    places that carry it.
    """
    spec = InterventionSpec.resolve(spec, **settings)
    effects, latent = _latent_effects(model, x, layer, mode, space, spec)
    if not as_maps:
        return effects.to(x.device)
    if mode == "channel":
        magnitude = latent.abs().to(effects.dtype)
        total = magnitude.sum(dim=1, keepdim=True)
        weighted = torch.einsum("nkc,nchw->nkhw", effects, magnitude)
        effects = torch.where(total > 0, weighted / total.clamp(min=torch.finfo(total.dtype).tiny), 0.0)
    maps = F.interpolate(effects, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
    return maps.to(x.device)
