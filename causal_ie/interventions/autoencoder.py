"""Latent CE through a small convolutional autoencoder inserted into the network.

The paper's code does not intervene on a layer's activation A directly: it
trains an autoencoder on A (classifier frozen; L1 reconstruction plus a
total-variation term) and zeroes one channel of the autoencoder's bottleneck at
a time. The bottleneck has few channels (16 instead of 128 for DenseNet-121
after transition1), so each intervention removes a learned "feature" rather
than one of the network's own, often redundant, channels.

:class:`AutoencoderSpace` is a :class:`~causal_ie.interventions.latent.LatentSpace`
(encode = prefix then encoder, decode = decoder then suffix), so
:func:`~causal_ie.interventions.latent.latent_effect` uses it
unchanged. :func:`autoencoder_space` trains the autoencoder once per
checkpoint, layer and setting and caches its weights on disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from causal_ie.interventions.latent import LatentSplit, latent_split
from causal_ie.io import atomic_open
from causal_ie.precision import full_precision
from causal_ie.runtime import eval_mode, model_device, to_model

log = logging.getLogger(__name__)

# bump when the architecture or the training procedure changes: old cache files are then ignored
CACHE_VERSION = 1


class ActivationAutoencoder(nn.Module):
    """3x3 convs ``channels -> hidden -> bottleneck`` (each followed by a ReLU) and back
    ``bottleneck -> hidden -> channels`` (the last one linear); spatial size kept.

    The non-negative bottleneck makes the zero baseline mean "this feature is absent".
    ``reconstruction_l1`` and ``activation_l1`` are buffers (NaN until trained, kept in
    the state dict and so in the cache): the fit's mean |recon - A| next to the mean |A|.
    """

    def __init__(self, channels: int, hidden: int = 32, bottleneck: int = 16):
        super().__init__()
        self.channels, self.hidden, self.bottleneck = int(channels), int(hidden), int(bottleneck)
        self.encoder = nn.Sequential(
            nn.Conv2d(self.channels, self.hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(self.hidden, self.bottleneck, 3, padding=1),
            nn.ReLU(),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(self.bottleneck, self.hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(self.hidden, self.channels, 3, padding=1),
        )
        self.register_buffer("reconstruction_l1", torch.tensor(float("nan")))
        self.register_buffer("activation_l1", torch.tensor(float("nan")))

    def encode(self, activation: Tensor) -> Tensor:
        """Bottleneck code [N, bottleneck, h, w] of activations [N, channels, h, w]."""
        return self.encoder(activation)

    def decode(self, code: Tensor) -> Tensor:
        """Reconstructed activations [N, channels, h, w]."""
        return self.decoder(code)

    def forward(self, activation: Tensor) -> Tensor:
        return self.decode(self.encode(activation))

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> ActivationAutoencoder:
        """An autoencoder shaped like ``state`` (as saved by :func:`autoencoder_space`), loaded."""
        hidden, channels = state["encoder.0.weight"].shape[:2]
        bottleneck = state["encoder.2.weight"].shape[0]
        # the throwaway default initialisation must not draw from the global generator:
        # a cache hit then leaves the RNG as a fresh training run does
        with torch.random.fork_rng(devices=[]):
            autoencoder = cls(channels, hidden, bottleneck)
        autoencoder.load_state_dict(state)
        return autoencoder


def total_variation(x: Tensor) -> Tensor:
    """Mean |difference| over all pairs of neighbouring cells of ``x`` [..., h, w], both axes
    together (0 for a single cell): penalises speckled reconstructions."""
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs()
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs()
    pairs = dh.numel() + dw.numel()
    if pairs == 0:
        return x.new_zeros(())
    return (dh.sum() + dw.sum()) / pairs


Batches = Iterable[Tensor] | Callable[[], Iterable[Tensor]]


def _cycle(batches: Batches) -> Iterator[Tensor]:
    """Batches pass after pass: a callable is called for each pass, an iterable re-iterated
    (a one-shot iterator therefore ends the training early with an error)."""
    for _ in itertools.count():
        produced = False
        for batch in batches() if callable(batches) else batches:
            produced = True
            yield batch
        if not produced:
            raise ValueError(
                "the autoencoder's training batches ran out (an empty data set, or a one-shot iterator "
                "that cannot be cycled: pass a list or a function returning a fresh iterable)"
            )


@dataclass(frozen=True)
class AutoencoderSettings:
    """How the activation autoencoder is built and trained (``latent.autoencoder.*``).

    ``hidden``/``bottleneck``: channels of the 3x3 convs C -> hidden -> bottleneck and back;
    ``steps`` Adam steps at learning rate ``lr`` on L1(recon, A) + ``tv_weight`` * TV(recon);
    ``seed`` seeds the initialisation.
    """

    hidden: int = 32
    bottleneck: int = 16
    steps: int = 500
    lr: float = 1e-3
    tv_weight: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden", "bottleneck", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"latent.autoencoder.{name} must be a whole number >= 1, got {value!r}")
        if not float(self.lr) > 0:
            raise ValueError(f"latent.autoencoder.lr must be > 0, got {self.lr!r}")
        if not float(self.tv_weight) >= 0:
            raise ValueError(f"latent.autoencoder.tv_weight must be >= 0, got {self.tv_weight!r}")

    @classmethod
    def of(cls, settings: AutoencoderSettings | Mapping[str, Any] | None) -> AutoencoderSettings:
        """Settings from a mapping (a Hydra block); unknown names are an error listing the known ones."""
        if isinstance(settings, cls):
            return settings
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(settings or {}) - set(known))
        if unknown:
            raise ValueError(f"latent.autoencoder has unknown settings {unknown}; known: {known}")
        return cls(**dict(settings or {}))


def train_autoencoder(
    split: LatentSplit, batches: Batches, settings: AutoencoderSettings | None = None, *, progress: bool = False
) -> ActivationAutoencoder:
    """Fit an :class:`ActivationAutoencoder` to the activations of ``split`` (the cut layer).

    ``batches``: images [B, C, H, W], cycled until ``settings.steps`` Adam steps (or a function
    returning a fresh iterable per pass). The classifier stays frozen: A is computed in eval
    mode under ``no_grad``, so its parameters never get gradients. The initialisation is
    seeded from ``settings.seed`` inside a forked RNG, leaving the global RNG untouched.

    It trains on the classifier's device, in the activation's dtype (float32 for a float32
    classifier, float64 for a float64 one; half-precision activations are trained on in
    float32), with autocast off and gradients on, so it may be called from inside a
    Lightning hook (which runs under ``no_grad``) or a mixed-precision step.
    Returns the autoencoder in eval mode, frozen, with ``reconstruction_l1`` /
    ``activation_l1`` measured over the last tenth of the steps.
    """
    settings = settings or AutoencoderSettings()
    steps, lr, tv_weight = int(settings.steps), float(settings.lr), float(settings.tv_weight)
    tail = max(1, steps // 10)
    stream = _cycle(batches)
    errors: list[Tensor] = []
    magnitudes: list[Tensor] = []
    autoencoder: ActivationAutoencoder | None = None
    optimiser: torch.optim.Optimizer | None = None
    with (
        eval_mode(split),
        torch.inference_mode(False),
        torch.enable_grad(),
        full_precision(model_device(split)),
    ):
        for step in tqdm(range(steps), disable=not progress, desc="autoencoder"):
            x = next(stream)
            with torch.no_grad():
                activation = split.encode(to_model(split, x))[0]
            if activation.dtype not in (torch.float32, torch.float64):
                activation = activation.float()
            if autoencoder is None:  # the channel count is only known from the first activation
                if activation.dim() != 4:
                    raise ValueError(
                        f"the autoencoder needs a feature map [N, C, h, w] at {split.layer!r}, "
                        f"got shape {tuple(activation.shape)}"
                    )
                with torch.random.fork_rng(devices=[]):
                    torch.default_generator.manual_seed(int(settings.seed))
                    autoencoder = ActivationAutoencoder(activation.shape[1], settings.hidden, settings.bottleneck)
                autoencoder = autoencoder.to(device=activation.device, dtype=activation.dtype).train()
                optimiser = torch.optim.Adam(autoencoder.parameters(), lr=lr)
            assert optimiser is not None
            reconstruction = autoencoder(activation)
            error = F.l1_loss(reconstruction, activation)
            loss = error + tv_weight * total_variation(reconstruction)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if step >= steps - tail:
                errors.append(error.detach())
                magnitudes.append(activation.abs().mean())
    assert autoencoder is not None
    autoencoder.reconstruction_l1.fill_(torch.stack(errors).mean())
    autoencoder.activation_l1.fill_(torch.stack(magnitudes).mean())
    autoencoder.eval().requires_grad_(False)
    log.info(
        "autoencoder at %s: reconstruction L1 %.4g vs mean |A| %.4g after %d steps",
        split.layer, float(autoencoder.reconstruction_l1), float(autoencoder.activation_l1), steps,
    )
    return autoencoder


class AutoencoderSpace(nn.Module):
    """The :class:`LatentSpace` of an autoencoder's bottleneck at the cut of ``split``:
    encode = prefix then encoder, decode = decoder then suffix."""

    def __init__(self, split: LatentSplit, autoencoder: ActivationAutoencoder):
        super().__init__()
        self.split = split
        self.autoencoder = autoencoder

    def encode(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        activation, carried = self.split.encode(x)
        return self.autoencoder.encode(activation), carried

    def decode(self, latent: Tensor, context: tuple[Tensor, ...], image_idx: Tensor) -> Tensor:
        return self.split.decode(self.autoencoder.decode(latent), context, image_idx)

    def forward(self, x: Tensor) -> Tensor:
        latent, context = self.encode(x)
        return self.decode(latent, context, torch.arange(x.shape[0], device=latent.device))


@dataclass(frozen=True)
class AutoencoderCache:
    """Where fitted autoencoders are kept (``directory``, e.g. ``paths.cache_dir``) and ``key``,
    which names the classifier's weights and its training images (see :func:`cache_path`)."""

    directory: str | Path
    key: str


def cache_path(cache_dir: str | Path, key: str, layer: str, settings: AutoencoderSettings) -> Path:
    """``cache_dir/autoencoders/<hash>.pt``, the hash over everything the weights depend on."""
    numbers = {k: (float(v) if k in ("lr", "tv_weight") else int(v)) for k, v in dataclasses.asdict(settings).items()}
    identity = json.dumps(
        {"version": CACHE_VERSION, "key": key, "layer": layer, **numbers}, sort_keys=True, default=str
    )
    digest = hashlib.sha256(identity.encode()).hexdigest()[:20]
    return Path(cache_dir) / "autoencoders" / f"{digest}.pt"


def autoencoder_space(
    model: nn.Module,
    layer: str,
    batches_factory: Callable[[], Iterable[Tensor]],
    *,
    cache_dir: str | Path,
    key: str,
    settings: AutoencoderSettings | None = None,
    progress: bool = False,
) -> AutoencoderSpace:
    """:class:`AutoencoderSpace` of ``model`` at ``layer``, the autoencoder loaded from the cache
    or trained (:func:`train_autoencoder` on ``batches_factory()``, called once per pass
    over the data) and saved there.

    ``key`` identifies the classifier (e.g. checkpoint path, size and mtime); the cache file
    also depends on the resolved layer and every training setting. An unreadable cache file
    is retrained over, with a warning.
    """
    split = latent_split(model, layer)
    settings = settings or AutoencoderSettings()
    path = cache_path(cache_dir, key, split.layer, settings)
    reference = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0))
    device = reference.device
    dtype = reference.dtype if reference.is_floating_point() else torch.float32
    autoencoder: ActivationAutoencoder | None = None
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            autoencoder = ActivationAutoencoder.from_state_dict(state)
            if (autoencoder.hidden, autoencoder.bottleneck) != (settings.hidden, settings.bottleneck):
                raise ValueError(f"shape {autoencoder.hidden}/{autoencoder.bottleneck} does not match the settings")
        except Exception as error:  # a stale or truncated file is never fatal: train again
            log.warning("cannot read the cached autoencoder %s (%s): training it again", path, error)
            autoencoder = None
        else:
            autoencoder = autoencoder.to(device).eval().requires_grad_(False)
            log.info("autoencoder for %s loaded from %s", split.layer, path)
    if autoencoder is None:
        autoencoder = train_autoencoder(split, batches_factory, settings, progress=progress)
        with atomic_open(path, "wb") as f:
            torch.save(autoencoder.state_dict(), f)
        log.info("autoencoder for %s cached at %s", split.layer, path)
    return AutoencoderSpace(split, autoencoder.to(device=device, dtype=dtype))
