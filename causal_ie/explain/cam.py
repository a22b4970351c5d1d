"""Class activation maps (pytorch-grad-cam) as baselines for the CE maps.

:class:`CAMExplainer` gives a CAM the explainers' call signature
``explainer(model, images, img_idx, finding_idx) -> maps [P, H, W]``, so the
evaluation scores CAMs and CE maps the same way. It hides three things the
evaluation should not have to care about: which layer a CAM looks at
(:func:`auto_target_layer`), that CAMs need gradients even though the test
loop runs without them, and that pytorch-grad-cam changes the model it is
given (eval mode, cleared ``.grad``, hooks), which is undone after each call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from pytorch_grad_cam import (
    AblationCAM,
    EigenCAM,
    EigenGradCAM,
    FullGrad,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from pytorch_grad_cam.ablation_layer import AblationLayer
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn

from causal_ie.layers import backbone_of, find_layer
from causal_ie.runtime import eval_mode

__all__ = ["CAM_METHODS", "CAMExplainer", "auto_target_layer", "resolve_target_layer"]

# canonical name -> pytorch-grad-cam class
CAM_METHODS: dict[str, type] = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "hirescam": HiResCAM,
    "scorecam": ScoreCAM,
    "ablationcam": AblationCAM,
    "eigencam": EigenCAM,
    "eigengradcam": EigenGradCAM,
    "layercam": LayerCAM,
    "fullgrad": FullGrad,
}
# other spellings (``++`` is awkward on a command line) -> canonical name
CAM_ALIASES = {"gradcampp": "gradcam++", "gradcamplusplus": "gradcam++"}

# keyword arguments of a CAM's __call__ rather than of its constructor
_CALL_KWARGS = ("aug_smooth", "eigen_smooth")


def auto_target_layer(model: nn.Module) -> str:
    """Dotted name (from ``model``) of the last convolutional feature block of its backbone.

    That is the layer the CAM papers use: the deepest one that still has a
    spatial layout. Per timm family: ResNets ``layer4[-1]``; EfficientNets
    and MobileNets ``bn2`` (the head convolution after its norm and
    activation); any other timm model the module of its last
    ``feature_info`` entry (DenseNet: ``features.norm5``); a plain network
    its last ``Conv2d``.
    """
    backbone, prefix = backbone_of(model)
    layer4 = getattr(backbone, "layer4", None)
    if isinstance(layer4, nn.Sequential) and len(layer4) > 0:
        return f"{prefix}layer4.{len(layer4) - 1}"
    if isinstance(getattr(backbone, "conv_head", None), nn.Module) and isinstance(
        getattr(backbone, "bn2", None), nn.Module
    ):
        return f"{prefix}bn2"
    feature_info = getattr(backbone, "feature_info", None)
    if feature_info:
        last = feature_info[-1]
        name = last.get("module") if isinstance(last, dict) else None
        if name:
            return f"{prefix}{name}"
    convs = [name for name, m in backbone.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(
            f"cannot choose a CAM target layer for {type(backbone).__name__}: no feature_info and no "
            f"Conv2d; pass target_layer='<dotted module name>'"
        )
    return f"{prefix}{convs[-1]}"


def resolve_target_layer(model: nn.Module, target_layer: str = "auto") -> tuple[str, nn.Module]:
    """``(dotted name, module)`` of the CAM layer: :func:`auto_target_layer` for ``"auto"``,
    else the named module, from ``model`` or from its backbone (:func:`causal_ie.layers.find_layer`)."""
    name = auto_target_layer(model) if target_layer == "auto" else target_layer
    return find_layer(model, name, key="target_layer")


@contextlib.contextmanager
def _model_state_restored(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters for the call; afterwards every module's train/eval
    mode, every parameter's ``requires_grad`` and ``.grad`` are as they were.

    pytorch-grad-cam puts the model in eval mode and clears its gradients;
    the caller's model must come back as it was. Frozen parameters also keep
    the CAM's backward pass from filling ``.grad`` (gradients flow to the
    activations through the input, which requires grad).
    """
    params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    for p, _, _ in params:
        p.requires_grad_(False)
    try:
        with eval_mode(model):
            yield
    finally:
        for p, requires_grad, grad in params:
            p.requires_grad_(requires_grad)
            p.grad = grad


class CAMExplainer:
    """A pytorch-grad-cam method behind the explainers' call signature.

    ``explainer(model, images [B,C,H,W] in [0,1], img_idx [P], finding_idx [P])``
    returns one map ``[P, H, W]`` per (image, finding) pair, on the images'
    device: the CAM of finding ``finding_idx[p]`` (its logit as target) on image
    ``img_idx[p]``, upsampled to the input size and min-max normalised per map
    as pytorch-grad-cam does. Pairs are processed ``batch_size`` at a time.

    Works inside ``torch.no_grad()`` and ``torch.inference_mode()`` (Lightning's
    test loop): gradients are re-enabled and the images copied into normal
    tensors for the call. Hooks are removed and the model's modes and flags
    restored afterwards.

    Args:
        method: one of :data:`CAM_METHODS` (case-insensitive; ``gradcampp`` = ``gradcam++``).
        target_layer: ``"auto"`` (:func:`auto_target_layer`) or a dotted module
            name, from the model (``"backbone.layer3"``) or its backbone (``"layer3"``).
            FullGrad ignores it (it uses every biased layer).
        batch_size: pairs per CAM pass; also the perturbation batch of
            Score-CAM and Ablation-CAM.
        **cam_kwargs: ``aug_smooth``/``eigen_smooth`` for the CAM call, anything
            else for the CAM class (e.g. ``ratio_channels_to_ablate``).
    """

    kind = "cam"

    def __init__(
        self,
        method: str = "gradcam",
        target_layer: str = "auto",
        batch_size: int = 32,
        **cam_kwargs: Any,
    ):
        key = str(method).lower()
        key = CAM_ALIASES.get(key, key)
        if key not in CAM_METHODS:
            valid = sorted([*CAM_METHODS, *CAM_ALIASES])
            raise ValueError(f"unknown CAM method {method!r}; valid names: {valid}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.method = key
        self.target_layer = target_layer
        self.batch_size = int(batch_size)
        self.call_kwargs = {k: cam_kwargs.pop(k) for k in _CALL_KWARGS if k in cam_kwargs}
        self.cam_kwargs = cam_kwargs

    def __repr__(self) -> str:
        return (
            f"CAMExplainer(method={self.method!r}, target_layer={self.target_layer!r}, "
            f"batch_size={self.batch_size})"
        )

    def _build_cam(self, model: nn.Module, layer: nn.Module):
        """A fresh pytorch-grad-cam object (it registers its hooks on construction)."""
        cam_class = CAM_METHODS[self.method]
        kwargs = dict(self.cam_kwargs)
        if self.method == "fullgrad":
            return cam_class(model=model, target_layers=[], **kwargs)
        if self.method == "ablationcam":
            kwargs.setdefault("batch_size", self.batch_size)
            kwargs.setdefault("ablation_layer", AblationLayer())  # the library default is one shared instance
        cam = cam_class(model=model, target_layers=[layer], **kwargs)
        if self.method == "scorecam":
            cam.batch_size = self.batch_size  # Score-CAM reads its batch size from this attribute
        return cam

    def __call__(self, model: nn.Module, images: Tensor, img_idx: Tensor, finding_idx: Tensor) -> Tensor:
        if images.ndim != 4:
            raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
        if img_idx.shape != finding_idx.shape or img_idx.ndim != 1:
            raise ValueError(
                f"img_idx and finding_idx must both be [P], got {tuple(img_idx.shape)} "
                f"and {tuple(finding_idx.shape)}"
            )
        height, width = images.shape[-2:]
        if img_idx.numel() == 0:
            return torch.zeros((0, height, width), dtype=torch.float32, device=images.device)
        _, layer = resolve_target_layer(model, self.target_layer)
        param = next(model.parameters(), None)
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        findings = [int(k) for k in finding_idx.tolist()]
        maps = []
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            torch.autocast(device_type=images.device.type, enabled=False),
            _model_state_restored(model),
        ):
            # indexing outside inference mode gives normal tensors that autograd accepts
            pairs = images.detach()[img_idx.to(images.device)].to(dtype)
            cam = self._build_cam(model, layer)
            try:
                for begin in range(0, len(findings), self.batch_size):
                    chunk = pairs[begin : begin + self.batch_size].clone().requires_grad_(True)
                    targets = [ClassifierOutputTarget(k) for k in findings[begin : begin + self.batch_size]]
                    chunk_maps = cam(input_tensor=chunk, targets=targets, **self.call_kwargs)
                    maps.append(torch.from_numpy(chunk_maps))
            finally:
                cam.activations_and_grads.release()  # not `with cam:`, whose exit swallows IndexError
        return torch.cat(maps).to(device=images.device, dtype=torch.float32)
