"""Finding a layer of a classifier by name: the one lookup CAMs and latent CE share.

The project's classifiers keep their network in ``backbone`` (a timm model
behind the input normaliser), so a layer may be named from the classifier
(``backbone.layer3``) or from the backbone (``layer3``). Which layer ``auto``
means differs per method and stays with the method (the last conv block for
CAMs, a mid-level block for latent CE).
"""

from __future__ import annotations

import difflib

from torch import nn


def backbone_of(model: nn.Module) -> tuple[nn.Module, str]:
    """The network inside ``model`` (its ``backbone`` when it has one) and that name prefix."""
    inner = getattr(model, "backbone", None)
    return (inner, "backbone.") if isinstance(inner, nn.Module) else (model, "")


def layer_suggestions(model: nn.Module, near: str = "", limit: int = 12) -> list[str]:
    """Names worth suggesting in an error: those most like ``near``, then the backbone's stages
    (its children and timm's ``feature_info`` modules)."""
    backbone, prefix = backbone_of(model)
    relative = [name for name, _ in backbone.named_modules() if name]
    close = difflib.get_close_matches(near, relative, n=4, cutoff=0.5) if near else []
    stages = [name for name, _ in backbone.named_children()]
    for entry in getattr(backbone, "feature_info", None) or []:
        if isinstance(entry, dict) and entry.get("module") and entry["module"] not in stages:
            stages.append(entry["module"])
    return list(dict.fromkeys(prefix + name for name in close + stages))[:limit]


def find_layer(model: nn.Module, name: str, key: str = "layer") -> tuple[str, nn.Module]:
    """``(qualified name, module)`` of layer ``name`` of ``model``, looked up from the model and
    then from its backbone; a ValueError naming the setting ``key`` and suggesting names otherwise."""
    backbone, prefix = backbone_of(model)
    for root, root_prefix in ((model, ""), (backbone, prefix)):
        if not name:
            break
        try:
            return f"{root_prefix}{name}", root.get_submodule(name)
        except AttributeError:
            continue
    raise ValueError(
        f"{key}={name!r} is not a module of {type(model).__name__}; valid names include "
        f"{layer_suggestions(model, name)}"
    )
