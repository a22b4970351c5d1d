"""Exact incremental inference for pixel-space interventions (issue #15).

A perturbed input that differs from its clean image only inside a known box
changes only a growing neighbourhood of that box in the early feature maps.
:class:`IncrementalForward` recomputes just that neighbourhood, reading the
unchanged context from activations of the clean image cached once, and runs
the rest of the network in full on the patched activation (the *cut*):

- the model is traced with ``torch.fx`` (timm's non-traceable modules and
  functions kept as leaves, as in :mod:`causal_ie.interventions.latent`);
- every node gets a rule for how the changed box moves through it
  (:mod:`.rules`): *window* ops (convolutions, max and average pooling:
  kernel, stride, dilation, padding, ``ceil_mode``) grow it by their context and
  recompute it on a region read from the cached clean input, whose border holds
  the op's own padding (0, or -inf for max pooling); *pointwise* ops
  (activations, BatchNorm in eval as an affine, the project's ``Normalize``,
  arithmetic with constants, dropout in eval, per-pixel LayerNorm2d) keep it;
  *union* ops (add/sub/mul/div of two branches, channel ``cat``) take the union
  of their inputs' boxes; *resample* ops (``F.interpolate``, every mode, e.g. the bilinear
  antialiased resize of torchxrayvision models in :class:`~causal_ie.models.XRVClassifier`)
  are linear and separable, ``A_rows @ x @ A_cols.T`` with weights read off the op itself: a
  changed interval reaches the outputs whose weights touch it, and their patch is computed
  from the input rows those weights read; anything else (global pooling, ``mean`` over space,
  flatten, linear, attention, ...) is *global*: everything changes from there;
- boxes are tracked per axis (:mod:`.geometry`) for every possible position of the input box
  (all rules are separable in rows and columns), so each node's recomputed
  patch has one size for the whole batch and only its position varies; the
  positions per box are table look-ups at run time;
- where the patch exceeds a share of its map (``cut_fraction``; ``"auto"``
  picks the share with the lowest estimated cost (:mod:`.planning`): multiply-adds of the convs
  plus a cost per activation element moved), the rest runs in full;
- models that do not trace, mutate values that are read again later, or mix
  globally so early that nothing is gained, run plain forwards; ``supported``
  and ``reason`` say so (logged once per model).

Exactness: the same kernels run on the same values (resampling: a matrix product with the
op's own weights, equal to ``F.interpolate`` within float32 rounding); only the spatial extent
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

Modules: :mod:`.rules` (tracing, each node's rule), :mod:`.geometry` (where the changed values
can be), :mod:`.planning` (the cut and the cost model), :mod:`.forward` (caches and patched
forwards), :mod:`.boxes`.
"""

from causal_ie.interventions.incremental.boxes import changed_boxes, mask_boxes, window_boxes
from causal_ie.interventions.incremental.forward import (
    CACHE_LIMIT,
    IncrementalForward,
    incremental_forward,
    incremental_support,
)
from causal_ie.interventions.incremental.geometry import Geometry, window_geometry
from causal_ie.interventions.incremental.planning import CUT_AUTO
from causal_ie.interventions.incremental.rules import Window

__all__ = [
    "CACHE_LIMIT",
    "CUT_AUTO",
    "Geometry",
    "IncrementalForward",
    "Window",
    "changed_boxes",
    "incremental_forward",
    "incremental_support",
    "mask_boxes",
    "window_boxes",
    "window_geometry",
]
