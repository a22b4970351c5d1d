"""Fast full forwards for the CE engine (issue #15): channels_last, inference mode, torch.compile.

Incremental inference (:mod:`causal_ie.interventions.incremental`) removes most of
the work of sliding-window CE; what is left runs full forwards: the network after
the incremental cut, models the incremental engine refuses (and every forward
with ``incremental=false``), and the suffix of latent CE. :class:`EngineSettings`
(``conf/engine/``) says how they run:

- :func:`engine_session`: the model's 4-D weights in channels_last for the
  duration of a call (restored bit for bit afterwards, so a caller's model is
  unchanged), and ``torch.inference_mode`` around the forwards;
- :func:`compiled`: ``torch.compile`` of a module (inductor, by default with
  freezing: BatchNorm folded into the convolutions), cached per module,
  settings and weights, so a run compiles once; batches are padded to a fixed
  size so one shape serves every batch; if compiling fails, a warning and the
  eager forward.

With the defaults (channels_last on, compile off) maps equal the NCHW eager
forward to float32 rounding (tested within 1e-5).
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from causal_ie.interventions.spec import EngineSettings

log = logging.getLogger(__name__)

# compiled callables kept at once (each holds its module, and inductor's kernels, alive)
COMPILE_CACHE_SIZE = 8


# ---------------------------------------------------------------- channels_last and inference mode


def _conv_tensors(model: nn.Module) -> Iterator[Tensor]:
    seen: set[int] = set()
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.dim() == 4 and id(tensor) not in seen:
            seen.add(id(tensor))
            yield tensor


# per model: the channels_last copy of each converted tensor and the original it was made from
_CL_COPIES: weakref.WeakKeyDictionary[nn.Module, dict[int, tuple[tuple, Tensor]]] = weakref.WeakKeyDictionary()
# per model inside channels_last_weights: weights_version of its own (restored) weights
_SESSION_VERSION: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def channels_last_weights(model: nn.Module) -> Iterator[None]:
    """The model's 4-D parameters and buffers in channels_last for the block; afterwards each gets
    its own storage back (the same tensor object, bit for bit). The converted copies are kept per
    model (rebuilt when a weight changes), so repeated calls convert nothing. A no-op inside an
    outer ``torch.inference_mode`` (converted weights would become inference tensors)."""
    if torch.is_inference_mode_enabled() or model in _SESSION_VERSION:
        yield
        return
    copies = _CL_COPIES.setdefault(model, {})
    swapped: list[tuple[Tensor, Tensor]] = []
    _SESSION_VERSION[model] = weights_version(model)
    try:
        with torch.no_grad():
            for tensor in _conv_tensors(model):
                if tensor.is_contiguous(memory_format=torch.channels_last):
                    continue
                original = tensor.data
                stamp = (original.data_ptr(), tensor._version, original.dtype, original.device, tuple(original.shape))
                hit = copies.get(id(tensor))
                if hit is None or hit[0] != stamp:
                    hit = (stamp, original.contiguous(memory_format=torch.channels_last))
                    copies[id(tensor)] = hit
                tensor.data = hit[1]
                swapped.append((tensor, original))
        yield
    finally:
        for tensor, original in swapped:
            tensor.data = original
        _SESSION_VERSION.pop(model, None)


@contextlib.contextmanager
def engine_session(model: nn.Module, settings: EngineSettings, differentiable: bool = False) -> Iterator[None]:
    """What a CE call's forwards run under: channels_last weights (``settings.channels_last``) and
    inference mode (``settings.inference_mode``; plain ``no_grad`` with it off, autograd on with
    ``differentiable``). Call :func:`release` on results that leave the block."""
    with contextlib.ExitStack() as stack:
        if settings.channels_last and not differentiable:
            stack.enter_context(channels_last_weights(model))
        if differentiable:
            stack.enter_context(torch.enable_grad())
        elif settings.inference_mode:
            stack.enter_context(torch.inference_mode())
        else:
            stack.enter_context(torch.no_grad())
        yield


def release(tensor: Tensor) -> Tensor:
    """An ordinary tensor of ``tensor`` (an inference tensor is copied, so callers may change it in
    place outside inference mode); call outside the inference-mode block."""
    return tensor.clone() if isinstance(tensor, Tensor) and tensor.is_inference() else tensor


# ---------------------------------------------------------------- torch.compile, cached


def weights_version(module: nn.Module) -> tuple:
    """Changes when any parameter or buffer is replaced or changed in place (an optimiser step,
    ``load_state_dict``): frozen compiled code must then be rebuilt. Inside
    :func:`channels_last_weights` the version of the model's own weights."""
    if module in _SESSION_VERSION:
        return _SESSION_VERSION[module]
    return tuple((t.data_ptr(), t._version) for t in (*module.parameters(), *module.buffers()))


@dataclass
class CompileRecord:
    """One compiled callable: what it is, how long its compilations took, whether it failed."""

    what: str
    seconds: float = 0.0
    compilations: int = 0
    failed: str = ""
    shapes: set = field(default_factory=set)


@dataclass
class _Entry:
    owner: weakref.ref
    version: tuple
    compiled: Callable[..., Any]
    record: CompileRecord


_CACHE: OrderedDict[tuple, _Entry] = OrderedDict()
# every compilation of this process, for reports (benchmarks print the warm-up time)
RECORDS: list[CompileRecord] = []


def compile_seconds() -> float:
    """Seconds spent compiling so far in this process (first calls of each shape)."""
    return sum(r.seconds for r in RECORDS)


def compiled(
    module: nn.Module,
    settings: EngineSettings,
    *,
    batch: int,
    batched: tuple[bool, ...] | None = None,
    key: Any = None,
    owner: nn.Module | None = None,
    what: str | None = None,
) -> Callable[..., Any]:
    """``module`` compiled with ``settings`` (``torch.compile``, inductor), as a callable on the same
    arguments, cached: the same ``owner`` (default: ``module``), ``key``, settings, autocast state and
    weights give the same compiled code, so only the first call of a shape compiles.

    Inputs whose flag in ``batched`` is true (default: every tensor argument) share a batch
    dimension; they are padded to ``batch`` rows (the last row repeated) and the output cut back,
    so batches of any size up to ``batch`` run one compiled shape (larger ones run in chunks).
    If compiling or running the compiled code fails, a warning names the error and the eager
    ``module`` runs from then on.
    """
    owner = owner if owner is not None else module
    label = what or type(owner).__name__
    autocast = tuple(
        torch.get_autocast_dtype(d) if torch.is_autocast_enabled(d) else None for d in ("cpu", "cuda")
    )
    cache_key = (id(owner), key, settings, autocast, batch)
    version = weights_version(owner)
    entry = _CACHE.get(cache_key)
    if entry is not None and (entry.owner() is not owner or entry.version != version):
        if entry.owner() is owner:
            log.info("weights of %s changed: compiling it again", label)
        del _CACHE[cache_key]
        entry = None
    if entry is None:
        options = {"freezing": True} if settings.freeze else None
        fn = torch.compile(module, mode=None if settings.compile_mode == "default" else settings.compile_mode,
                           dynamic=False, options=options)
        record = CompileRecord(label)
        RECORDS.append(record)
        entry = _Entry(weakref.ref(owner), version, fn, record)
        _CACHE[cache_key] = entry
        while len(_CACHE) > COMPILE_CACHE_SIZE:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(cache_key)
    return _PaddedCall(module, entry, batch, batched)


class _PaddedCall:
    """Calls the compiled module on batches padded to ``batch`` rows; eager after a failure."""

    def __init__(self, module: nn.Module, entry: _Entry, batch: int, batched: tuple[bool, ...] | None):
        self.module, self.entry, self.batch, self.batched = module, entry, batch, batched

    def __call__(self, *args: Any) -> Any:
        record = self.entry.record
        if record.failed:
            return self.module(*args)
        flags = self.batched if self.batched is not None else tuple(isinstance(a, Tensor) for a in args)
        rows = next((a.shape[0] for a, f in zip(args, flags) if f), None)
        if rows is None or rows == 0:
            return self.module(*args)
        if rows > self.batch:
            parts = [self(*self._slice(args, flags, s, min(rows, s + self.batch))) for s in range(0, rows, self.batch)]
            return torch.cat(parts)
        padded = args
        if rows < self.batch:
            index = torch.arange(self.batch).clamp(max=rows - 1)
            padded = tuple(a.index_select(0, index.to(a.device)) if f else a for a, f in zip(args, flags))
        shape = tuple(tuple(a.shape) for a, f in zip(padded, flags) if f)
        first = shape not in record.shapes
        start = time.perf_counter()
        if first:
            log.info("torch.compile %s for CE (batch %d, shapes %s): the first call compiles (minutes on a CPU)",
                     record.what, self.batch, [s[1:] for s in shape])
        try:
            out = self.entry.compiled(*padded)
        except Exception as err:  # noqa: BLE001 - any compiler failure: run eager
            record.failed = f"{type(err).__name__}: {err}"
            log.warning("torch.compile of %s failed (%s); the eager forward runs instead",
                        record.what, record.failed.splitlines()[0][:300])
            return self.module(*args)
        if first:
            record.shapes.add(shape)
            record.compilations += 1
            elapsed = time.perf_counter() - start
            record.seconds += elapsed
            log.info("torch.compile %s: compiled in %.1f s (warm-up, not a CE cost of later calls)", record.what, elapsed)
        return out[:rows] if rows < self.batch else out

    @staticmethod
    def _slice(args: tuple, flags: tuple[bool, ...], start: int, stop: int) -> tuple:
        return tuple(a[start:stop] if f else a for a, f in zip(args, flags))
