"""Adaptive attacks: PGD against the classifier *and* a CE-based detector (issue #14).

A detector that only stops an attacker who ignores it is no defence (Carlini &
Wagner 2017, "Adversarial examples are not easily detected"; Tramer et al. 2020,
"On adaptive attacks to adversarial example defenses"). :class:`AdaptivePGD`
knows the detector: it is handed ``detector_logit(images) -> [B]`` (higher =
"adversarial") and runs PGD on

    J(x) = gain(x) - lambda * detector_logit(x),     ascended, in the eps ball and [0, 1],

where ``gain`` is torchattacks' own PGD loss on the attacked finding k
(:class:`~causal_ie.attacks.wrapper.FindingLogits`: softmax cross-entropy on
[0, z_k], which is the BCE of finding k): untargeted ``+BCE(z_k, y_k)`` (push the
prediction away from the true label), targeted ``-BCE(z_k, t)`` (pull it to
t = 1, "add a finding", or 0). With ``weight=0`` and no random start the
iterates are torchattacks' PGD bit for bit (tested).

Detector features that are not differentiable (indicators such as "does
occluding this window flip the prediction", argmax/argsort selections) get a
gradient by BPDA (Athalye, Carlini & Wagner 2018): forward the true function,
backward a differentiable surrogate -- :func:`bpda` and the straight-through
helpers :func:`straight_through_step` (an indicator), :func:`straight_through_flip`
("occluding this window flips the prediction": the signs of the clean logit z
and the occluded one z' differ), :func:`straight_through_argmax` and
:func:`straight_through_topk` (hard selections).

:func:`logistic_logit` turns a fitted sklearn ``[finite->0,] StandardScaler,
LogisticRegression`` pipeline (:func:`causal_ie.attacks.detection.fit_detector`'s
``logistic``) into the same logit as a torch function of the features, so a
detector trained with sklearn can be differentiated.

Cost. One PGD step of one image is one forward and backward of the classifier
plus one forward and backward of the detector; a differentiable CE detector
with R windows and S baselines in all its ``causal_effect`` calls forwards
(R * S + number of calls) perturbed copies of the image and keeps all their
activations for the backward pass, so memory is about ``batch_size * (R*S +
calls)`` times one image's activations. Per image and lambda run:
``steps`` such steps plus one gradient-free evaluation of the last iterate;
with a lambda schedule at most ``len(weight)`` runs (fewer with ``threshold``).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from causal_ie import validators
from causal_ie.attacks.factory import STEP_SIZE_FACTOR, Adversarial
from causal_ie.runtime import eval_mode, model_device, to_model

log = logging.getLogger(__name__)

__all__ = [
    "AdaptiveAdversarial",
    "AdaptivePGD",
    "DetectorLogit",
    "bpda",
    "logistic_logit",
    "straight_through_argmax",
    "straight_through_flip",
    "straight_through_step",
    "straight_through_topk",
]

# images [B, C, H, W] in [0, 1] -> one detector logit per image [B] (higher = "adversarial")
DetectorLogit = Callable[[Tensor], Tensor]

# torchattacks' PGDL2 adds this to gradient norms before dividing
_EPS_FOR_DIVISION = 1e-10


# ----------------------------------------------------------------------------- BPDA


class _StraightThrough(torch.autograd.Function):
    """Forward ``value``; backward the incoming gradient to ``surrogate`` unchanged."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, surrogate: Tensor) -> Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:
        return None, grad


def bpda(value: Tensor, surrogate: Tensor) -> Tensor:
    """BPDA (Athalye et al. 2018): a tensor whose forward value is ``value`` exactly and whose
    gradient is that of ``surrogate``.

    ``value`` is the true, possibly non-differentiable result (an indicator, a hard
    selection; any dtype, bool too), ``surrogate`` a differentiable function of the same
    inputs of the same shape that approximates it. The result has the surrogate's floating
    dtype (``value`` converted to it: exact for indicators and anything representable) and
    d result / d surrogate = identity, so gradients reach the inputs through the surrogate.
    Unlike ``surrogate + (value - surrogate).detach()`` the forward value is ``value``
    itself, with no rounding and no NaN where the surrogate is infinite.
    """
    if not isinstance(value, Tensor) or not isinstance(surrogate, Tensor):
        raise TypeError("bpda(value, surrogate) takes two tensors")
    if not surrogate.is_floating_point():
        raise ValueError(f"the BPDA surrogate must be a floating tensor, got dtype {surrogate.dtype}")
    if value.shape != surrogate.shape:
        raise ValueError(
            f"bpda: value {tuple(value.shape)} and surrogate {tuple(surrogate.shape)} must have the same shape"
        )
    return _StraightThrough.apply(value.detach().to(device=surrogate.device, dtype=surrogate.dtype), surrogate)


def _temperature(temperature: float) -> float:
    t = float(temperature)
    if isinstance(temperature, bool) or not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def straight_through_step(z: Tensor, temperature: float = 1.0) -> Tensor:
    """``1[z > 0]`` (in z's dtype) forward, the gradient of ``sigmoid(z / temperature)`` backward.

    The gradient at z = 0 is ``1 / (4 temperature)``; choose ``temperature`` on the scale of
    z (1 for logits). An indicator ``a > b`` is ``straight_through_step(a - b)``.
    """
    t = _temperature(temperature)
    return bpda(z > 0, torch.sigmoid(z / t))


def straight_through_flip(before: Tensor, after: Tensor, temperature: float = 1.0) -> Tensor:
    """``1[(after > 0) != (before > 0)]`` (a prediction flips between two logits, e.g. clean and
    occluded) forward; backward the gradient of ``s_a (1 - s_b) + (1 - s_a) s_b`` with
    ``s = sigmoid(logit / temperature)`` (the probability of a flip if both signs were coins).
    ``before`` broadcasts against ``after`` (e.g. logits [N, K, 1] against effects [N, K, R]).
    """
    t = _temperature(temperature)
    before, after = torch.broadcast_tensors(before, after)
    s_before, s_after = torch.sigmoid(before / t), torch.sigmoid(after / t)
    surrogate = s_after * (1 - s_before) + (1 - s_after) * s_before
    return bpda((after > 0) != (before > 0), surrogate)


def straight_through_argmax(scores: Tensor, dim: int = -1, temperature: float = 1.0) -> Tensor:
    """One-hot of ``scores.argmax(dim)`` (ties: torch's first maximum) forward, the gradient of
    ``softmax(scores / temperature, dim)`` backward.

    ``(straight_through_argmax(logits) * maps).sum(dim)`` selects the map of the most likely
    finding exactly and lets the gradient also move which finding that is.
    """
    t = _temperature(temperature)
    index = scores.argmax(dim=dim, keepdim=True)
    hard = torch.zeros_like(scores).scatter_(dim, index, 1.0)
    return bpda(hard, torch.softmax(scores / t, dim=dim))


def straight_through_topk(scores: Tensor, k: int, dim: int = -1, temperature: float = 1.0) -> Tensor:
    """Mask of the ``k`` largest ``scores`` along ``dim`` (torch.topk's choice) forward; backward
    the gradient of ``sigmoid((scores - tau) / temperature)`` with tau halfway between the k-th
    and (k+1)-th largest score (held constant). With ``k`` = the whole dimension the mask is all
    ones and has no gradient.
    """
    t = _temperature(temperature)
    size = scores.shape[dim]
    if isinstance(k, bool) or int(k) != k or not 1 <= k <= size:
        raise ValueError(f"k must be a whole number in [1, {size}] (the size of dim {dim}), got {k!r}")
    k = int(k)
    top = scores.detach().topk(min(k + 1, size), dim=dim)
    hard = torch.zeros_like(scores).scatter_(dim, top.indices.narrow(dim, 0, k), 1.0)
    if k == size:
        return bpda(hard, scores * 0)
    tau = top.values.narrow(dim, k - 1, 2).mean(dim=dim, keepdim=True)
    return bpda(hard, torch.sigmoid((scores - tau) / t))


# ----------------------------------------------------------------------------- sklearn -> torch


def logistic_logit(estimator: Any) -> Callable[[Tensor], Tensor]:
    """A fitted sklearn logistic detector as a differentiable torch function
    ``features [B, F] -> logit [B]``, equal to ``estimator.decision_function`` (the log-odds of
    ``classes_[1]``, "adversarial" for labels 0/1).

    ``estimator``: a ``LogisticRegression`` (binary) or a ``Pipeline`` of ``FunctionTransformer``
    steps whose function maps non-finite values to 0 (its name must contain ``finite``, as
    :func:`causal_ie.attacks.detection.fit_detector`'s ``_finite_or_zero``), ``StandardScaler``
    and a final binary ``LogisticRegression``. Anything else raises (its torch version would be
    a guess). The fitted constants are copied; the function takes the features' device and dtype.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    steps = list(estimator.steps) if isinstance(estimator, Pipeline) else [("clf", estimator)]
    ops: list[tuple[str, Any]] = []
    for position, (name, step) in enumerate(steps):
        last = position == len(steps) - 1
        if step is None or step == "passthrough":
            continue
        if isinstance(step, LogisticRegression):
            if not last:
                raise ValueError(f"logistic_logit: the LogisticRegression step {name!r} must be the last step")
            if len(step.classes_) != 2:
                raise ValueError(f"logistic_logit needs a binary LogisticRegression, got classes {list(step.classes_)}")
            ops.append(("linear", (torch.as_tensor(step.coef_[0]), torch.as_tensor(step.intercept_[0]))))
        elif last:
            raise ValueError(f"logistic_logit: the last step must be a LogisticRegression, got {type(step).__name__}")
        elif isinstance(step, StandardScaler):
            mean = torch.as_tensor(step.mean_) if step.with_mean else None
            scale = torch.as_tensor(step.scale_) if step.with_std else None
            ops.append(("scale", (mean, scale)))
        elif isinstance(step, FunctionTransformer) and "finite" in getattr(step.func, "__name__", ""):
            ops.append(("finite", None))
        else:
            raise ValueError(
                f"logistic_logit: step {name!r} ({type(step).__name__}) has no torch version; expected "
                "non-finite->0 FunctionTransformers, StandardScaler and a final LogisticRegression"
            )

    def logit(features: Tensor) -> Tensor:
        if not isinstance(features, Tensor) or features.ndim != 2 or not features.is_floating_point():
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"features must be a floating tensor [B, F], got {shape}")
        x = features
        for kind, params in ops:
            if kind == "finite":
                x = torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))
            elif kind == "scale":
                mean, scale = params
                if mean is not None:
                    x = x - mean.to(x.device, x.dtype)
                if scale is not None:
                    x = x / scale.to(x.device, x.dtype)
            else:
                coef, intercept = params
                if x.shape[1] != coef.shape[0]:
                    raise ValueError(f"the detector was fitted on {coef.shape[0]} features, got {x.shape[1]}")
                return x @ coef.to(x.device, x.dtype) + intercept.to(x.device, x.dtype)
        raise AssertionError("unreachable: the pipeline ends with a LogisticRegression")

    return logit


# ----------------------------------------------------------------------------- the attack


@dataclass
class AdaptiveAdversarial(Adversarial):
    """:class:`~causal_ie.attacks.factory.Adversarial` (``images``, ``attacked`` [N, K],
    ``goal`` [N, K], ``targeted``) plus, per image:

    ``finding`` [N] the attacked finding; ``success`` [N] whether ``images`` reach the
    goal (sigmoid(z_k) > 0.5 differs from the true label, or equals the target);
    ``detector_logit`` [N] the detector's logit of ``images``; ``weight`` [N] the lambda
    of the run that produced them; ``runs`` [N] how many lambda runs the image took part
    in (its cost is ``runs * steps`` attack steps); ``last`` [N, C, H, W] the final PGD
    iterate of its last run (what plain PGD returns).
    """

    finding: Tensor
    success: Tensor
    detector_logit: Tensor
    weight: Tensor
    runs: Tensor
    last: Tensor


@contextlib.contextmanager
def _frozen(*modules: nn.Module) -> Iterator[None]:
    """Parameters of ``modules`` with ``requires_grad=False`` for the duration, each flag restored
    afterwards (shared parameters once). Only input gradients are taken (torch.autograd.grad),
    so no ``.grad`` is ever written; freezing also spares autograd the weight gradients."""
    flags: dict[int, tuple[nn.Parameter, bool]] = {}
    for module in modules:
        for p in module.parameters():
            flags.setdefault(id(p), (p, p.requires_grad))
    for p, _ in flags.values():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, requires_grad in flags.values():
            p.requires_grad_(requires_grad)


class AdaptivePGD:
    """PGD (L-inf or L2, random start) on the classification loss of one finding per image minus
    ``weight`` times a detector's logit: an attacker who knows the detector.

    Per image i with attacked finding k_i the ascended objective is
    ``gain_i(x) - lambda_i * detector_logit(x)_i``, averaged over the batch as torchattacks
    does (``gain``: +BCE(z_k, y_k) untargeted, -BCE(z_k, t) targeted; see the module doc).
    Each step: L-inf ``x + alpha * sign(grad)``, L2 ``x + alpha * grad / ||grad||``; then
    projection onto the eps ball around the clean image and clamping to [0, 1], as
    torchattacks' PGD/PGDL2.

    Best iterate: every iterate (the start, each step, the last) is scored; an image keeps
    the successful one with the lowest detector logit, or, while none succeeded, the one with
    the highest ``gain`` (closest to success). ``keep_best=False`` returns the last iterate.

    Lambda: ``weight`` a number runs once with that lambda. A sequence is a schedule, tried in
    the order given (ascending is the useful order, e.g. ``(0, 0.1, 1, 10)``), each run from a
    fresh start; an image keeps the best iterate over all its runs (rule above). With
    ``threshold``, an image stops after the first run whose best iterate is successful with a
    detector logit below it: the smallest lambda that evades at that operating point (Carlini &
    Wagner's search for the smallest sufficient constant, on a fixed grid instead of a binary
    search so the cost is bounded: at most ``len(weight) * steps`` steps per image). Without
    ``threshold`` every image runs every lambda (the lowest successful logit wins, so the
    result does not depend on an operating point and suits an AUROC).

    ``selective=True`` (Bryniarski et al. 2022, "selective" PGD): an image whose finding is
    already flipped by more than ``margin`` (logit units) steps on ``-detector_logit`` alone,
    one that is not on the full objective; no balancing of the two losses is needed
    (``weight=0`` then attacks the classifier until the flip, the detector afterwards).

    ``orthogonal=True`` (Bryniarski et al. 2022, "orthogonal" PGD): an image whose finding is not
    yet flipped by ``margin`` steps on the classification gradient with its component along the
    detector's gradient removed (the step leaves the detector's logit unchanged to first order),
    a flipped one on the negative detector gradient with its component along the classification
    gradient removed (the flip is kept to first order); the projections are per image, before
    the sign (L-inf) or the normalisation (L2). Lambda plays no part then: the schedule's runs
    are restarts from fresh random starts.

    Args:
        detector_logit: images [B, C, H, W] in [0, 1] -> logits [B] (higher = adversarial),
            differentiable w.r.t. the images (use :func:`bpda` for non-differentiable parts),
            one value per image independent of the other images of the batch. Called on
            batches of at most ``batch_size`` images, on the classifier's device and dtype.
            An ``nn.Module`` is put in eval mode and its parameters frozen for the call.
        eps: radius of the ball in [0, 1] pixel units (L-inf: at most 1).
        steps: PGD steps per lambda run.
        alpha: step size; None: ``2.5 * eps / steps`` (Madry et al. 2018).
        norm: ``Linf`` or ``L2``.
        random_start: start uniformly in the L-inf ball (L2: torchattacks' PGDL2 draw), a new
            draw for each lambda run.
        seed: seeds a local ``torch.Generator`` for the random starts (the global RNG is never
            touched); None: a fresh nondeterministic seed.
        weight: lambda, a number >= 0 or a sequence of them (a schedule, above).
        threshold: detector logit below which an image counts as evading (stops the schedule).
        selective: Bryniarski et al.'s selective steps (above).
        orthogonal: Bryniarski et al.'s orthogonal steps (above; implies the selective switch).
        margin: logit margin past the decision boundary before ``selective`` switches to the
            detector.
        mode: ``untargeted`` (away from the true label) or ``targeted`` (towards ``to``).
        to: ``present`` (add the finding) or ``absent`` for ``targeted``.
        batch_size: images attacked at once (bounds memory; see the module doc for the cost).
        keep_best: return the best iterate (True) or the last one.
    """

    def __init__(
        self,
        detector_logit: DetectorLogit,
        *,
        eps: float,
        steps: int = 10,
        alpha: float | None = None,
        norm: str = "Linf",
        random_start: bool = True,
        seed: int | None = 0,
        weight: float | Sequence[float] = 1.0,
        threshold: float | None = None,
        selective: bool = False,
        orthogonal: bool = False,
        margin: float = 0.0,
        mode: str = "untargeted",
        to: str = "present",
        batch_size: int = 8,
        keep_best: bool = True,
    ):
        if not callable(detector_logit):
            raise TypeError(f"detector_logit must be callable (images -> [B] logits), got {type(detector_logit).__name__}")
        self.detector_logit = detector_logit
        self.norm = validators.norm("norm", norm)
        self.eps = validators.number("eps", eps, 0.0, 1.0 if self.norm == "Linf" else math.inf)
        self.steps = validators.count("steps", steps)
        self.alpha = (
            STEP_SIZE_FACTOR * self.eps / self.steps if alpha is None else validators.number("alpha", alpha, 0.0, low_open=True)
        )
        self.random_start = bool(random_start)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        self.seed = seed
        schedule = [weight] if isinstance(weight, int | float) and not isinstance(weight, bool) else weight
        try:
            schedule = list(schedule)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError(f"weight must be a number >= 0 or a sequence of them, got {weight!r}") from None
        if not schedule:
            raise ValueError("weight must hold at least one lambda")
        self.weights = tuple(validators.number("weight", w, 0.0) for w in schedule)
        self.threshold = None if threshold is None else validators.number("threshold", threshold)
        self.selective = bool(selective)
        self.orthogonal = bool(orthogonal)
        self.margin = validators.number("margin", margin, 0.0)
        if mode not in ("untargeted", "targeted"):
            raise ValueError(f"mode={mode!r}: expected 'untargeted' or 'targeted'")
        if to not in ("present", "absent"):
            raise ValueError(f"to={to!r}: expected 'present' or 'absent'")
        self.mode, self.to = mode, to
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.batch_size = batch_size
        self.keep_best = bool(keep_best)

    @property
    def targeted(self) -> bool:
        return self.mode == "targeted"

    def __repr__(self) -> str:
        return (
            f"AdaptivePGD(norm={self.norm}, eps={self.eps}, steps={self.steps}, alpha={self.alpha:.4g}, "
            f"weight={self.weights}, threshold={self.threshold}, selective={self.selective}, "
            f"orthogonal={self.orthogonal}, mode={self.mode!r}"
            f"{', to=' + repr(self.to) if self.targeted else ''}, random_start={self.random_start}, "
            f"batch_size={self.batch_size})"
        )

    # -- entry point -----------------------------------------------------------------
    def __call__(
        self, model: nn.Module, images: Tensor, labels: Tensor, finding: Tensor | int | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None, resume: Mapping[str, Any] | None = None,
    ) -> AdaptiveAdversarial:
        """Attack ``images`` [N, C, H, W] in [0, 1] with true ``labels`` [N, K] (0/1) on finding
        ``finding`` of each image (LongTensor [N], one int for all, or None: each image's most
        likely finding on the clean image, as ``attack.target=top``).

        ``progress`` is called after every batch of every lambda run with the loop's state (CPU
        tensors); the same images with that state as ``resume`` continue after that batch and
        end where an uninterrupted call does (a long study survives a stop).

        Runs the model in eval mode, its parameters (and a detector module's) frozen; every
        flag comes back afterwards and no parameter gets a ``.grad``. Works inside
        ``torch.no_grad()`` and ``torch.inference_mode()``.
        """
        if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a floating tensor [N, C, H, W] in [0, 1], got {shape}")
        if images.shape[0] == 0:
            raise ValueError("images is empty")
        if images.min() < 0 or images.max() > 1:
            raise ValueError("attack inputs must lie in [0, 1] (the classifier normalises them itself)")
        if self.norm == "L2" and self.eps > math.sqrt(images[0].numel()):
            raise ValueError(
                f"eps={self.eps} is an L2 radius larger than sqrt(C*H*W) = {math.sqrt(images[0].numel()):.4g}, "
                "the largest distance between two images in [0, 1]"
            )
        detector_modules = [self.detector_logit] if isinstance(self.detector_logit, nn.Module) else []
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(torch.autocast(device_type=model_device(model, images.device).type, enabled=False))
            stack.enter_context(eval_mode(model))
            for module in detector_modules:
                stack.enter_context(eval_mode(module))
            stack.enter_context(_frozen(model, *detector_modules))
            # copies made outside inference mode are ordinary tensors autograd accepts
            x0 = to_model(model, images.detach().clone())
            result = self._attack(model, x0, labels.detach().clone(), finding, progress, resume)
        result.images = result.images.to(device=images.device, dtype=images.dtype)
        result.last = result.last.to(device=images.device, dtype=images.dtype)
        return result

    # -- pieces ------------------------------------------------------------------------
    def _findings(self, clean: Tensor, finding: Tensor | int | None) -> Tensor:
        n, k = clean.shape
        if finding is None:
            return clean.nan_to_num(float("-inf")).argmax(dim=1)
        if isinstance(finding, bool):
            raise ValueError(f"finding must be an int, a LongTensor [N] or None, got {finding!r}")
        if isinstance(finding, int):
            finding = torch.full((n,), finding, dtype=torch.long)
        if not isinstance(finding, Tensor) or finding.shape != (n,) or finding.is_floating_point():
            shape = tuple(finding.shape) if isinstance(finding, Tensor) else type(finding).__name__
            raise ValueError(f"finding must be an int, a LongTensor [N] = [{n}] or None, got {shape}")
        finding = finding.detach().clone().long().to(clean.device)
        if finding.min() < 0 or finding.max() >= k:
            raise ValueError(f"finding indices must lie in [0, {k}) (the classifier's findings), got {finding.tolist()}")
        if torch.isnan(clean.gather(1, finding[:, None])).any():
            raise ValueError("an attacked finding's logit is NaN: the classifier does not predict it")
        return finding

    def _start(self, x0: Tensor, generator: torch.Generator) -> Tensor | None:
        """Random-start offsets for all N images (drawn for all, so they do not depend on
        ``batch_size`` or on which images are still running)."""
        if not self.random_start:
            return None
        if self.norm == "Linf":
            return torch.empty_like(x0).uniform_(-self.eps, self.eps, generator=generator)
        delta = torch.empty_like(x0).normal_(generator=generator)
        n = delta.flatten(1).norm(p=2, dim=1).view(-1, 1, 1, 1)
        r = torch.zeros_like(n).uniform_(0, 1, generator=generator)
        return delta * (r / n * self.eps)

    def _success(self, z: Tensor, goal: Tensor) -> Tensor:
        predicted, wanted = torch.sigmoid(z) > 0.5, goal > 0.5
        return predicted == wanted if self.targeted else predicted != wanted

    def _detect(self, x: Tensor, graph: bool) -> Tensor:
        d = self.detector_logit(x)
        if not isinstance(d, Tensor) or d.shape != (x.shape[0],):
            shape = tuple(d.shape) if isinstance(d, Tensor) else type(d).__name__
            raise ValueError(f"detector_logit must return one logit per image, shape [{x.shape[0]}], got {shape}")
        if torch.isnan(d).any():
            raise ValueError("detector_logit returned NaN")
        if graph and not d.requires_grad:
            raise ValueError(
                "detector_logit returned a tensor with no autograd graph, so the attack cannot follow it: "
                "compute its features differentiably (causal_effect(..., differentiable=True), no "
                "torch.no_grad, no .detach/.item/numpy) and give non-differentiable parts a gradient with bpda()"
            )
        return d

    def _project(self, x: Tensor, x0: Tensor, grad: Tensor) -> Tensor:
        """One step as torchattacks' PGD (L-inf) or PGDL2, with its projection and clamp."""
        if self.norm == "Linf":
            x = x.detach() + self.alpha * grad.sign()
            delta = torch.clamp(x - x0, min=-self.eps, max=self.eps)
            return torch.clamp(x0 + delta, min=0, max=1).detach()
        b = x.shape[0]
        grad_norms = torch.norm(grad.view(b, -1), p=2, dim=1) + _EPS_FOR_DIVISION
        x = x.detach() + self.alpha * (grad / grad_norms.view(b, 1, 1, 1))
        delta = x - x0
        delta_norms = torch.norm(delta.view(b, -1), p=2, dim=1)
        # torchattacks: min(eps / ||delta||, 1), which is NaN for eps = ||delta|| = 0
        factor = torch.where(delta_norms > self.eps, self.eps / delta_norms, torch.ones_like(delta_norms))
        return torch.clamp(x0 + delta * factor.view(-1, 1, 1, 1), min=0, max=1).detach()

    @staticmethod
    def _orthogonal_direction(gain: Tensor, d: Tensor, x: Tensor, done: Tensor) -> Tensor:
        """Per image: the ascent direction of the gain without its component along the detector's
        gradient (not yet flipped), or the descent direction of the detector without its
        component along the gain's gradient (flipped, ``done``)."""
        (g_gain,) = torch.autograd.grad(gain.sum(), x, retain_graph=True)
        (g_det,) = torch.autograd.grad(d.sum(), x)
        b = x.shape[0]
        a, c = g_gain.reshape(b, -1), -g_det.reshape(b, -1)

        def without(u: Tensor, v: Tensor) -> Tensor:  # u minus its projection on v, per row
            scale = (u * v).sum(1, keepdim=True) / (v * v).sum(1, keepdim=True).clamp_min(1e-30)
            return u - scale * v

        step = torch.where(done[:, None], without(c, a), without(a, c))
        return step.reshape_as(x)

    def _run(
        self, model: nn.Module, x0: Tensor, goal: Tensor, finding: Tensor, lam: float, start: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """One lambda run on one batch of images: (chosen iterate, its success, detector logit and
        gain, last iterate); the chosen iterate is the best one, or the last without keep_best."""
        b = x0.shape[0]
        x = x0.clone() if start is None else torch.clamp(x0 + start, min=0, max=1)
        target = goal.long()
        sign = torch.where(goal > 0.5, -1.0, 1.0).to(x0.dtype)  # untargeted: the side z_k must reach
        if self.targeted:
            sign = -sign
        best_x = x.clone()
        best_ok = torch.zeros(b, dtype=torch.bool, device=x.device)
        best_d = torch.full((b,), math.inf, dtype=x.dtype, device=x.device)
        best_gain = torch.full((b,), -math.inf, dtype=x.dtype, device=x.device)
        detector_needed = lam != 0 or self.selective or self.orthogonal
        for t in range(self.steps + 1):
            final = t == self.steps
            x = x.detach().requires_grad_(not final)
            with torch.set_grad_enabled(not final):
                z = model(x).gather(1, finding[:, None]).squeeze(1)
                ce = F.cross_entropy(torch.stack([torch.zeros_like(z), z], dim=1), target, reduction="none")
                gain = -ce if self.targeted else ce
            graph = detector_needed and not final
            with torch.set_grad_enabled(graph):  # a detached input: no graph even if the detector enables grad
                d = self._detect(x if graph else x.detach(), graph=graph)
            ok = self._success(z.detach(), goal)
            dd, gg = d.detach(), gain.detach()
            better = (ok & (~best_ok | (dd < best_d))) | (~ok & ~best_ok & (gg > best_gain))
            best_x[better] = x.detach()[better]
            best_ok, best_d, best_gain = best_ok | ok, torch.where(better, dd, best_d), torch.where(better, gg, best_gain)
            if final:
                break
            if self.orthogonal:
                done = sign * z.detach() > self.margin
                grad = self._orthogonal_direction(gain, d, x, done)
                x = self._project(x, x0, grad)
                continue
            if self.selective:
                done = sign * z.detach() > self.margin
                objective = (torch.where(done, 0.0, 1.0).to(gain.dtype) * gain).mean()
                objective = objective - (torch.where(done, 1.0, lam).to(d.dtype) * d).mean()
            elif lam != 0:
                objective = gain.mean() - (lam * d).mean()
            else:
                objective = gain.mean()  # torchattacks' PGD loss exactly
            (grad,) = torch.autograd.grad(objective, x)
            x = self._project(x, x0, grad)
        last = x.detach()
        if not self.keep_best:
            return last, ok, dd, gg, last
        return best_x, best_ok, best_d, best_gain, last

    def _attack(self, model: nn.Module, x0: Tensor, labels: Tensor, finding: Tensor | int | None,
                progress: Callable[[dict[str, Any]], None] | None = None,
                resume: Mapping[str, Any] | None = None) -> AdaptiveAdversarial:
        device = x0.device
        with torch.no_grad():
            clean = model(x0)
        n, k = clean.shape
        labels = labels.to(device=device, dtype=torch.float32)
        if labels.shape != (n, k):
            raise ValueError(f"labels must be [N, K] = {(n, k)}, got {tuple(labels.shape)}")
        finding = self._findings(clean, finding)
        rows = torch.arange(n, device=device)
        to_value = 1.0 if self.to == "present" else 0.0
        goal_all = torch.full_like(labels, to_value) if self.targeted else labels.clone()
        goal = goal_all[rows, finding].to(x0.dtype)
        attacked = torch.zeros_like(labels, dtype=torch.bool)
        attacked[rows, finding] = True

        seed = self.seed if self.seed is not None else int(torch.Generator().seed() % (2**63))
        generator = torch.Generator(device=device).manual_seed(seed)
        images, last = x0.clone(), x0.clone()
        success = torch.zeros(n, dtype=torch.bool, device=device)
        logit = torch.full((n,), math.inf, dtype=x0.dtype, device=device)
        gain = torch.full((n,), -math.inf, dtype=x0.dtype, device=device)
        weight = torch.full((n,), math.nan, dtype=torch.float64, device=device)
        runs = torch.zeros(n, dtype=torch.long, device=device)
        active = torch.ones(n, dtype=torch.bool, device=device)
        loop = {"images": images, "last": last, "success": success, "logit": logit, "gain": gain, "weight": weight,
                "runs": runs, "active": active}
        at_round, at_batch = 0, 0  # where the loop (re)starts
        if resume is not None:
            if tuple(resume["images"].shape) != tuple(x0.shape):
                raise ValueError(f"resume: the saved attack ran on {tuple(resume['images'].shape)} images, not "
                                 f"{tuple(x0.shape)}")
            for key, tensor in loop.items():
                tensor.copy_(resume[key].to(device=device, dtype=tensor.dtype))
            at_round, at_batch = int(resume["round"]), int(resume["next"])
        for r, lam in enumerate(self.weights):
            start = self._start(x0, generator)  # drawn for every run, skipped or not: the same stream
            if r < at_round:
                continue
            idx_all = torch.nonzero(active).flatten()
            for a in range(0, idx_all.numel(), self.batch_size):
                if r == at_round and a < at_batch:
                    continue
                idx = idx_all[a : a + self.batch_size]
                bx, bok, bd, bg, blast = self._run(
                    model, x0[idx], goal[idx], finding[idx], lam, None if start is None else start[idx]
                )
                if self.keep_best:
                    better = (bok & (~success[idx] | (bd < logit[idx]))) | (~bok & ~success[idx] & (bg > gain[idx]))
                else:  # the last run counts
                    better = torch.ones_like(bok)
                sel = idx[better]
                images[sel], success[sel], logit[sel], gain[sel] = bx[better], bok[better], bd[better], bg[better]
                weight[sel] = lam
                last[idx] = blast
                runs[idx] += 1
                if progress is not None:
                    progress({"round": r, "next": a + self.batch_size,
                              **{k: v.detach().cpu().clone() for k, v in loop.items()}})
            if self.threshold is not None:
                active &= ~(success & (logit < self.threshold))
            # progress: each lambda round is a full PGD run through the differentiable detector
            log.info("adaptive PGD, lambda=%g: %d image(s) attacked, %d of %d at the goal, %d still above the "
                     "detector threshold", lam, idx_all.numel(), int(success.sum()), n, int(active.sum()))
            if not active.any():
                break
        return AdaptiveAdversarial(
            images=images.detach(),
            attacked=attacked,
            goal=goal_all,
            targeted=self.targeted,
            finding=finding,
            success=success,
            detector_logit=logit,
            weight=weight,
            runs=runs,
            last=last,
        )
