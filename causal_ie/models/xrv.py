"""Pretrained chest X-ray classifiers from torchxrayvision, behind the project's classifier contract.

Researchers mostly explain models someone else trained. :class:`XRVClassifier`
wraps a torchxrayvision network so CE, CAMs, attacks and counterfactuals use it
exactly like a trained :class:`~causal_ie.models.Classifier`: ``forward`` takes
[N, 1, H, W] images in [0, 1] and returns one logit per label the network predicts,
in its own label space (:attr:`XRVClassifier.labels`: 18 labels for
``densenet121-res224-all``, among them Lung Opacity and Fracture; the unnamed outputs
of a CheXpert model are left out). An evaluation on a data set aligns the data's
labels to these by name (:func:`causal_ie.labels.align`).

Why the network's own ``forward`` is not used: with ``op_threshs`` set (every
pretrained weights file) torchxrayvision returns piecewise-linearly rescaled
*probabilities* (``op_norm``: the operating point maps to 0.5), not logits.
Inverting that would go through a sigmoid that saturates in float32 (a logit of
20 comes back as probability 1.0, i.e. an infinite logit, with a zero
gradient), and outputs whose threshold is NaN are replaced by a constant 0.5,
which cannot be inverted at all. The wrapper therefore runs the layers itself
(DenseNet: ``features`` -> ReLU -> global average pool -> ``classifier``, as
``DenseNet.features2``; ResNet: torchvision's forward) and returns the exact
pre-sigmoid outputs; the operating points stay available as
:attr:`XRVClassifier.operating_points`. Resizing (bilinear, antialiased, as
torchxrayvision's ``fix_resolution``) and the [0, 1] -> [-1024, 1024] scaling
happen inside, differentiably, without torchxrayvision's first-batch print
statements.

Weights never download here: they come from torchxrayvision's cache
(``~/.torchxrayvision/models_data/``, file name as torchxrayvision's release
URL) or from ``model.checkpoint``; with neither, construction fails naming both.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType

import torch
from lightning.fabric.utilities.data import AttributeDict
from torch import Tensor, nn
from torch.nn import functional as F

from causal_ie.labels import LabelSpace

# torchxrayvision's input range: images scaled from [0, maxval] to [-1024, 1024] (xrv.datasets.normalize)
XRV_MAX = 1024.0
RANDOM = "random"
ARCHS = ("densenet121", "resnet50")
# the pretrained weights the wrapper knows, by architecture prefix of torchxrayvision's names
_ARCH_OF_PREFIX = {"densenet121-": "densenet121", "resnet50-": "resnet50"}


def _xrv() -> ModuleType:
    """torchxrayvision, imported on first use.

    Importing it runs ``warnings.filterwarnings("ignore")`` at module level, which would
    silence every warning of the process; ``catch_warnings`` puts the filters back.
    """
    with warnings.catch_warnings():
        import torchxrayvision

    return torchxrayvision


def xrv_weight_names() -> list[str]:
    """The pretrained weights names torchxrayvision knows that the wrapper can build."""
    return [name for name in _xrv().models.model_urls if any(name.startswith(p) for p in _ARCH_OF_PREFIX)]


def _canonical_weights(weights: str) -> str:
    """torchxrayvision's full weights name (``nih`` -> ``densenet121-res224-nih``); ValueError if unknown."""
    urls = _xrv().models.model_urls
    names = xrv_weight_names()
    if weights in names:
        return weights
    if weights in urls:  # the short aliases ('all', 'nih', ...) share the full name's entry
        full = [name for name in names if urls[name] is urls[weights]]
        if full:
            return full[0]
    raise ValueError(
        f"model.weights={weights!r} is not a torchxrayvision weights name; expected one of "
        f"{', '.join(names)} or {RANDOM!r} (random weights, architecture from model.arch)"
    )


def _arch_of(weights: str) -> str:
    return next(arch for prefix, arch in _ARCH_OF_PREFIX.items() if weights.startswith(prefix))


def cache_path(weights: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where torchxrayvision keeps (and would download) the file of ``weights``:
    ``cache_dir`` (default ``xrv.utils.get_cache_dir()``, ``~/.torchxrayvision/models_data/``)
    joined with the release URL's file name, as ``xrv.models.get_weights`` does."""
    xrv = _xrv()
    url = xrv.models.model_urls[_canonical_weights(weights)]["weights_url"]
    folder = xrv.utils.get_cache_dir() if cache_dir is None else str(cache_dir)
    return Path(os.path.expanduser(os.path.join(folder, os.path.basename(url))))


def build_network(arch: str, num_outputs: int) -> nn.Module:
    """torchxrayvision's architecture with random weights and ``num_outputs`` outputs, without
    touching the network or the cache.

    ``densenet121``: ``xrv.models.DenseNet`` built with ``weights=None``. ``resnet50``:
    torchvision's ResNet-50 with a one-channel stem, exactly what ``xrv.models.ResNet``
    builds internally (its own constructor always fetches weights).
    """
    xrv = _xrv()
    if arch == "densenet121":
        return xrv.models.DenseNet(
            num_classes=num_outputs, in_channels=1, weights=None, **xrv.models.get_densenet_params(arch)
        )
    if arch == "resnet50":
        import torchvision

        net = torchvision.models.resnet50(num_classes=num_outputs, weights=None)
        net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        return net
    raise ValueError(f"model.arch={arch!r} is not an architecture torchxrayvision ships; expected one of {', '.join(ARCHS)}")


def _load_error(err: Exception) -> str:
    """The informative line of a ``torch.load`` error (its weights_only message is mostly boilerplate)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    return " ".join(text.split())[:300] or type(err).__name__


def read_weights(path: Path, source: str) -> dict[str, Tensor]:
    """The network's state dict from a weights file; ValueError starting with ``source`` (the
    file and the setting it came from) when it holds none.

    Accepted: a state dict (loaded with ``weights_only=True``), one nested under
    ``state_dict``, an :class:`XRVClassifier`'s own state dict (``backbone.`` keys), an
    ``xrv.models.ResNet``'s (``model.`` keys), or a whole pickled module. torchxrayvision's
    DenseNet release files are the last kind, which torchxrayvision itself loads with
    ``weights_only=False``: a file that the safe ``weights_only`` load refuses for naming
    classes ("Unsupported global") is unpickled in full, as torchxrayvision does, so give
    only files you trust (text, truncated or empty files are never unpickled in full).
    """
    expected = (
        "a torchxrayvision weights file (the release .pt of model.weights, as torchxrayvision "
        "caches it) or a state dict of the same network saved with torch.save"
    )
    if path.stat().st_size == 0:
        raise ValueError(f"{source} is an empty file; expected {expected}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = _load_error(err)
        if "Unsupported global" not in reason:  # garbage, text, a truncated file: no second try
            raise ValueError(f"{source} cannot be read as a torch file ({reason}); expected {expected}") from None
        try:  # pickled whole objects, as torchxrayvision's own DenseNet files
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as full:
            raise ValueError(
                f"{source} cannot be read as a torch file ({type(full).__name__}: {full}); expected {expected}"
            ) from None
    if isinstance(obj, nn.Module):
        # torchxrayvision's patch for modules pickled by old torch versions
        for module in obj.modules():
            if not hasattr(module, "_non_persistent_buffers_set"):
                module._non_persistent_buffers_set = set()
        obj = obj.state_dict()
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{source} holds a {type(obj).__name__}, not a state dict; expected {expected}")
    state = {str(k): v for k, v in obj.items()}
    for prefix in ("backbone.", "model."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    state.pop("op_threshs", None)  # torchxrayvision's calibration buffer, not a weight
    return state


class XRVClassifier(nn.Module):
    """A torchxrayvision classifier with the project's contract: [0, 1] images in, one logit per label out.

    Args:
        weights: a torchxrayvision weights name (``densenet121-res224-all``, ``-nih``,
            ``-chex``, ``-pc``, ``-rsna``, ``-mimic_nb``, ``-mimic_ch``, ``resnet50-res512-all``;
            the short aliases ``all``, ``nih``, ... too) or ``random`` (the architecture
            ``arch`` with random weights, for tests).
        checkpoint: a weights file on disk; wins over the cache. With ``weights=random`` it
            is loaded into the ``arch`` network.
        cache_dir: the folder torchxrayvision caches weights in (null: its default,
            ``~/.torchxrayvision/models_data/``).
        arch: ``densenet121`` or ``resnet50``; only for ``weights=random`` (default densenet121).
        pathologies: the network's output names; only for ``weights=random`` (default
            torchxrayvision's 18 ``default_pathologies``). Named weights bring their own.
        input_resolution: the side the images are resized to before the network (null: the
            weights' native 224 or 512; 224 for random weights).

    Attributes:
        labels: the output columns' label space: the network's named outputs, in its order.
        findings: their names (``labels.names``).
        missing_findings: always empty: outputs the network does not predict are not columns.
        pathologies: the network's own output names (torchxrayvision's spelling, '' unused).
        operating_points: torchxrayvision's per-output operating point (a probability; the
            calibrated output is 0.5 there), NaN where unknown.
        weights_file: the file the weights came from (None for random weights).
        hparams: ``backbone`` (``xrv:<weights>``), ``image_size`` (None: any size is resized)
            and the constructor's settings, readable as attributes or with ``.get``.
    """

    def __init__(
        self,
        weights: str = "densenet121-res224-all",
        checkpoint: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        arch: str | None = None,
        pathologies: Sequence[str] | None = None,
        input_resolution: int | None = None,
    ):
        super().__init__()
        xrv = _xrv()
        weights = str(weights)
        if weights == RANDOM:
            arch = "densenet121" if arch is None else str(arch)
            if arch not in ARCHS:
                raise ValueError(f"model.arch={arch!r}: expected one of {', '.join(ARCHS)}")
            names = list(xrv.datasets.default_pathologies if pathologies is None else pathologies)
            native, thresholds = 224, None
        else:
            weights = _canonical_weights(weights)
            if arch is not None and arch != _arch_of(weights):
                raise ValueError(f"model.arch={arch!r} does not match model.weights={weights!r}; set model.arch=null")
            if pathologies is not None:
                raise ValueError(
                    f"model.pathologies: model.weights={weights} defines its own outputs; set model.pathologies=null"
                )
            arch = _arch_of(weights)
            entry = xrv.models.model_urls[weights]
            names = list(entry["labels"])
            native, thresholds = int(entry.get("input_resolution", 224)), entry.get("op_threshs")
        resolution = native if input_resolution is None else input_resolution
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"model.input_resolution must be a whole number of pixels >= 1 or null, got {input_resolution!r}")

        weights_file = self._weights_file(weights, checkpoint, cache_dir)
        self.arch = arch
        self.weights = weights
        self.weights_file = weights_file
        self.input_resolution = resolution
        self.pathologies = tuple(str(p) for p in names)
        self.backbone = build_network(arch, len(self.pathologies))
        # the layer CAMs pick with cam_layer=auto (timm's convention, as timm's DenseNet: the last norm)
        if arch == "densenet121":
            self.backbone.feature_info = [{"module": "features.norm5", "num_chs": 1024, "reduction": 32}]
        if weights_file is not None:
            if checkpoint is not None:
                source = f"model.checkpoint={str(checkpoint)!r}"
            else:
                source = f"torchxrayvision's cached file {str(weights_file)!r} (model.weights={weights})"
            state = read_weights(weights_file, source)
            try:
                self.backbone.load_state_dict(state)
            except RuntimeError as err:
                raise ValueError(
                    f"{source} does not fit torchxrayvision's {arch} with "
                    f"{len(self.pathologies)} outputs ({str(err).splitlines()[0]} ...): pick the model.weights "
                    f"name the file belongs to (with weights=random: model.arch and model.pathologies)"
                ) from None

        # output column j is network output column_index[j]: the named outputs, in the network's order
        named = [i for i, p in enumerate(self.pathologies) if p]
        backbone = f"xrv:{weights if weights != RANDOM else f'{RANDOM}-{arch}'}"
        self.labels = LabelSpace(tuple(self.pathologies[i] for i in named), backbone)
        self.findings: tuple[str, ...] = self.labels.names
        self.missing_findings: tuple[str, ...] = ()
        self.register_buffer(
            "column_index", None if len(named) == len(self.pathologies) else torch.tensor(named), persistent=False
        )
        points = [float("nan") if thresholds is None else float(thresholds[i]) for i in named]
        self.register_buffer("operating_points", torch.tensor(points), persistent=False)

        self.hparams = AttributeDict(
            backbone=backbone,
            image_size=None,
            weights=weights,
            arch=arch,
            checkpoint=None if checkpoint is None else str(checkpoint),
            weights_file=None if weights_file is None else str(weights_file),
            input_resolution=resolution,
            labels=self.labels.as_dict(),
            pathologies=list(self.pathologies),
        )
        self.requires_grad_(False)  # evaluation only; input gradients still flow
        self.eval()

    @staticmethod
    def _weights_file(weights: str, checkpoint: str | os.PathLike | None, cache_dir: str | os.PathLike | None) -> Path | None:
        """The file to load: ``checkpoint``, else the cache file; an error naming both before any
        download could start (this wrapper never downloads)."""
        if checkpoint is not None:
            path = Path(checkpoint).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"model.checkpoint={str(checkpoint)!r} does not exist (a torchxrayvision weights file)")
            return path
        if weights == RANDOM:
            return None
        path = cache_path(weights, cache_dir)
        if not path.is_file():
            url = _xrv().models.model_urls[weights]["weights_url"]
            raise FileNotFoundError(
                f"model.weights={weights}: no weights file in torchxrayvision's cache at {str(path)!r}, and no "
                f"model.checkpoint given. This run does not download: fetch {url} on a machine with network, "
                f"then copy it to {str(path)!r} (or set model.cache_dir=<folder holding it>), or pass "
                f"model.checkpoint=/path/to/{os.path.basename(url)}"
            )
        return path

    @property
    def num_findings(self) -> int:
        return len(self.findings)

    def network_input(self, x: Tensor) -> Tensor:
        """[0, 1] images resized to the network's resolution and scaled to [-1024, 1024]."""
        r = self.input_resolution
        x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=True)
        return x * (2 * XRV_MAX) - XRV_MAX

    def network_logits(self, x: Tensor) -> Tensor:
        """The network's raw outputs [N, len(pathologies)] for already prepared input (no op_norm)."""
        if self.arch == "densenet121":
            features = self.backbone.features(x)
            pooled = F.adaptive_avg_pool2d(F.relu(features), 1).flatten(1)
            return self.backbone.classifier(pooled)
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits [N, len(labels)] of [N, 1, H, W] images in [0, 1], in :attr:`labels` order."""
        logits = self.network_logits(self.network_input(x))
        return logits if self.column_index is None else logits.index_select(1, self.column_index)

    def extra_repr(self) -> str:
        return f"weights={self.weights!r}, arch={self.arch}, input_resolution={self.input_resolution}, labels={len(self.labels)}"
