"""Resumable evaluation: the test loop's state on disk, and the signals that stop a run.

A long ``evaluate.py`` run (hours on NIH with the attack study) must survive a cluster's
preemption. :class:`EvaluationState` writes, per process, everything the test loop has
accumulated (every torchmetrics state, the examples kept for the figures, the attack study's
records, the RNG states) to ``<run dir>/evaluation_state/rank<r>.pt``, atomically, and reads it
back. A resumed run skips the batches already seen and continues from the saved state, so its
results equal an uninterrupted run's. The saved state names the settings it was computed with
(:func:`run_settings`); a resume with any other refuses and names the keys that differ.

:class:`StopSignals` turns SIGTERM (SLURM's preemption and time limit), SIGINT and SIGUSR1
(Lightning's SLURM requeue signal) into a request: the batch in progress finishes, the state
is saved, and :class:`EvaluationStopped` ends the run with a non-zero exit status.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchmetrics import Metric

from causal_ie.io import atomic_open
from causal_ie.stopping import EvaluationStopped

log = logging.getLogger(__name__)

__all__ = [
    "AdaptiveCheckpoint",
    "EvaluationState",
    "EvaluationStopped",
    "ResumeRefused",
    "StopSignals",
    "load_metric_states",
    "metric_states",
    "run_settings",
]

FORMAT = 1
STATE_DIR = "evaluation_state"
# settings that do not change a number in results.json: a resume may change them
IGNORED = (
    "hydra", "paths", "logger", "callbacks", "resume", "data.num_workers", "data.pin_memory",
    "evaluation.checkpoint_every", "evaluation.checkpoint_minutes", "trainer.enable_progress_bar",
    "trainer.enable_model_summary", "trainer.default_root_dir",
)
SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


class ResumeRefused(ValueError):
    """The saved state was computed with other settings than this run's."""


def run_settings(cfg: DictConfig, checkpoint: Path | None, ignored: Iterable[str] = IGNORED) -> dict[str, str]:
    """Every setting of ``cfg`` that can change a result, flattened to ``{"mask.size": "16"}``,
    with the checkpoint file's identity (path, size, modification time). Interpolations are
    resolved where they can be (``${seed}``); hydra, paths and loggers are left out."""
    skip = tuple(ignored)
    raw = OmegaConf.to_container(cfg, resolve=False)
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
            return
        if any(prefix == s or prefix.startswith(s + ".") for s in skip):
            return
        try:
            value = OmegaConf.select(cfg, prefix, throw_on_resolution_failure=True)
            if isinstance(value, (DictConfig, list)) or OmegaConf.is_config(value):
                value = OmegaConf.to_container(value, resolve=True)
        except Exception:  # e.g. ${hydra:...} outside a Hydra run: compare the expression
            value = node
        out[prefix] = repr(value)

    walk(raw, "")
    if checkpoint is not None:
        stat = Path(checkpoint).stat()
        out["checkpoint file"] = f"{Path(checkpoint).resolve()} ({stat.st_size} bytes, modified {stat.st_mtime_ns})"
    return out


# -- metric states ---------------------------------------------------------------------
def _metrics(module: nn.Module, skip: Iterable[nn.Module]) -> dict[str, Metric]:
    """The torchmetrics under ``module`` by their module path, leaving out the subtrees ``skip``
    (the classifier and explainers hold no test-loop state)."""
    skipped = {id(m) for s in skip for m in s.modules()}
    return {name: m for name, m in module.named_modules() if isinstance(m, Metric) and id(m) not in skipped}


def metric_states(module: nn.Module, skip: Iterable[nn.Module] = ()) -> dict[str, dict[str, Any]]:
    """Every metric's accumulated states (tensors, or lists of tensors for ``cat`` states) on
    the CPU, and how many updates it has seen."""
    out = {}
    for name, metric in _metrics(module, skip).items():
        states = {}
        for attr in metric._defaults:
            value = getattr(metric, attr)
            states[attr] = [v.detach().cpu() for v in value] if isinstance(value, list) else value.detach().cpu()
        out[name] = {"states": states, "updates": int(metric._update_count)}
    return out


def load_metric_states(module: nn.Module, saved: Mapping[str, Mapping[str, Any]], device: torch.device,
                       skip: Iterable[nn.Module] = ()) -> None:
    """Put ``saved`` (from :func:`metric_states`) back into the same metrics, on ``device``."""
    metrics = _metrics(module, skip)
    if set(metrics) != set(saved):
        differ = sorted(set(metrics) ^ set(saved))
        raise ResumeRefused(f"the saved evaluation state holds other metrics than this run ({', '.join(differ[:6])})")
    for name, metric in metrics.items():
        for attr, value in saved[name]["states"].items():
            setattr(metric, attr, [v.to(device) for v in value] if isinstance(value, list) else value.to(device))
        metric._update_count = int(saved[name]["updates"])
        metric._computed = None


def pad_empty_states(module: nn.Module, skip: Iterable[nn.Module] = ()) -> None:
    """Under DDP, give a process that saw no batch (an empty shard) empty ``cat`` states of the
    other processes' shape and dtype: torchmetrics would sync a 1-D empty tensor against their
    2-D ones. Every process must call it, in the same place (it is a collective)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    if world < 2:
        return
    metrics = _metrics(module, skip)
    local = {(name, attr): (tuple(getattr(m, attr)[0].shape[1:]), getattr(m, attr)[0].dtype)
             for name, m in metrics.items() for attr in m._defaults
             if isinstance(getattr(m, attr), list) and getattr(m, attr)}
    shapes: list[Any] = [None] * world
    torch.distributed.all_gather_object(shapes, local)
    for name, metric in metrics.items():
        for attr in metric._defaults:
            value = getattr(metric, attr)
            if not isinstance(value, list) or value:
                continue
            seen = next((s[(name, attr)] for s in shapes if (name, attr) in s), None)
            if seen is not None:
                value.append(torch.empty((0, *seen[0]), dtype=seen[1], device=metric.device))


# -- RNG ---------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """The global RNGs (Python, NumPy, torch CPU and CUDA): a resumed run continues their streams."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- the state on disk -------------------------------------------------------------------
class EvaluationState:
    """The saved test-loop state of one run directory: one file per process.

    Args:
        directory: where the files go (``<run dir>/evaluation_state``).
        settings: :func:`run_settings` of the run; a saved state with other settings is refused.
    """

    def __init__(self, directory: str | Path, settings: Mapping[str, str]):
        self.directory = Path(directory)
        self.settings = dict(settings)

    def path(self, rank: int) -> Path:
        return self.directory / f"rank{int(rank)}.pt"

    def exists(self) -> bool:
        return self.directory.is_dir() and any(self.directory.glob("rank*.pt"))

    def save(self, rank: int, world_size: int, batches: int, complete: bool, payload: Mapping[str, Any]) -> float:
        """Write this process's state atomically (a kill mid-write leaves the previous one);
        returns the seconds it took."""
        started = time.perf_counter()
        record = {"format": FORMAT, "settings": self.settings, "world_size": int(world_size), "rank": int(rank),
                  "batches": int(batches), "complete": bool(complete), "saved_at": time.time(), **payload}
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_open(self.path(rank), "wb") as f:
            torch.save(record, f)
        return time.perf_counter() - started

    def load(self, rank: int, world_size: int) -> dict[str, Any] | None:
        """This process's saved state (None when the run has none), after checking that it was
        computed with this run's settings and number of processes."""
        if not self.exists():
            return None
        ranks = sorted(int(p.stem[4:]) for p in self.directory.glob("rank*.pt") if p.stem[4:].isdigit())
        path = self.path(rank)
        if not path.is_file():
            raise ResumeRefused(
                f"{self.directory} holds the saved state of process(es) {ranks}, not of process {rank}: "
                f"resume with the number of processes it was saved with"
            )
        try:
            saved = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:
            raise ResumeRefused(f"{path}: unreadable saved evaluation state ({err}); delete {self.directory} "
                                "to start again") from None
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise ResumeRefused(f"{path}: not an evaluation state of this version (format {FORMAT} expected)")
        if int(saved["world_size"]) != int(world_size):
            raise ResumeRefused(
                f"{self.directory} was saved by {saved['world_size']} process(es), this run has {world_size}: "
                "resume with the same trainer.devices and trainer.num_nodes (each process continues its shard)"
            )
        differ = self.differences(saved["settings"])
        if differ:
            shown = "; ".join(differ[:8]) + ("; ..." if len(differ) > 8 else "")
            raise ResumeRefused(
                f"{self.directory} was saved with other settings than this run's: {shown}. Resume with the "
                "saved settings, or use another hydra.run.dir to start a new run"
            )
        return saved

    # the adaptive study (after the test loop, on global rank 0 only)
    def save_adaptive(self, progress: Mapping[str, Any]) -> None:
        with atomic_open(self.directory / "adaptive.pt", "wb") as f:
            torch.save({"format": FORMAT, "settings": self.settings, "progress": dict(progress)}, f)

    def load_adaptive(self) -> dict[str, Any] | None:
        """The adaptive study's saved progress (None when there is none). The test loop's state
        beside it has been checked against this run's settings; this file is checked too."""
        path = self.directory / "adaptive.pt"
        if not path.is_file():
            return None
        saved = torch.load(path, map_location="cpu", weights_only=False)
        differ = self.differences(saved.get("settings", {}))
        if saved.get("format") != FORMAT or differ:
            raise ResumeRefused(f"{path} was saved with other settings than this run's: {'; '.join(differ[:8])}")
        return saved["progress"]

    def differences(self, saved: Mapping[str, str]) -> list[str]:
        """``key: saved -> now`` for every setting that differs."""
        keys = sorted(set(saved) | set(self.settings))
        missing = "(not set)"
        return [f"{k}: {saved.get(k, missing)} -> {self.settings.get(k, missing)}" for k in keys
                if saved.get(k, missing) != self.settings.get(k, missing)]

    def wait_for(self, ranks: Iterable[int], since: float, timeout: float) -> list[int]:
        """Wait up to ``timeout`` s until each of ``ranks`` has saved after ``since`` (or saved
        its complete shard); returns those that did not."""
        pending = set(ranks)
        deadline = time.time() + timeout
        while pending and time.time() < deadline:
            for rank in list(pending):
                try:
                    saved = torch.load(self.path(rank), map_location="cpu", weights_only=False)
                except Exception:  # not written yet, or being replaced
                    continue
                if saved.get("saved_at", 0) >= since or saved.get("complete"):
                    pending.discard(rank)
            if pending:
                time.sleep(0.5)
        return sorted(pending)

    def clear(self) -> None:
        """Remove the saved state (the run has written its final results)."""
        for path in [*self.directory.glob("rank*.pt"), self.directory / "adaptive.pt"]:
            path.unlink(missing_ok=True)
        try:
            self.directory.rmdir()
        except OSError:  # not empty (a user's file) or already gone
            pass


# -- signals -----------------------------------------------------------------------------
class StopSignals:
    """While installed, SIGTERM, SIGINT and SIGUSR1 only record that a stop was asked for
    (``received``); the test loop saves and stops at the end of its batch. A second SIGINT
    interrupts at once (the state of the last save remains). ``forward`` is called with the
    signal (e.g. to pass it to the other processes of a DDP run)."""

    def __init__(self, forward: Callable[[int], None] | None = None):
        self.forward = forward
        self.received: int | None = None
        self.at: float | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            log.warning("evaluation state: not in the main thread, signals are not caught (periodic saves only)")
            return False
        for name in SIGNALS:
            signum = getattr(signal, name, None)
            if signum is not None:
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._handle)
        return True

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received, self.at = int(signum), time.time()
            log.warning("received %s: saving the evaluation state at the end of this batch, then stopping",
                        signal.Signals(signum).name)
            if self.forward is not None:
                self.forward(signum)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}


class AdaptiveCheckpoint:
    """The adaptive study's ``progress`` callback: saves every ``every`` attacked batches, at the
    latest after ``minutes``, and on a stop signal (then it raises :class:`EvaluationStopped`).
    ``resume``: the progress a stopped run saved, for :meth:`AdaptiveStudy.run`. Use as a
    context (it catches the signals while the study runs)."""

    def __init__(self, state: EvaluationState, every: int, minutes: float):
        self.state, self.every, self.minutes = state, int(every), float(minutes)
        self.signals = StopSignals()
        self.resume = state.load_adaptive()
        if self.resume is not None:
            log.info("resuming the adaptive study from %s", state.directory / "adaptive.pt")
        self.calls = 0
        self._last = time.monotonic()

    def __enter__(self) -> AdaptiveCheckpoint:
        self.signals.install()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.signals.restore()

    def __call__(self, progress: Mapping[str, Any]) -> None:
        self.calls += 1
        stop = self.signals.received
        if stop is not None or self.calls % self.every == 0 or time.monotonic() - self._last >= 60.0 * self.minutes:
            self.state.save_adaptive(progress)
            self._last = time.monotonic()
        if stop is not None:
            raise EvaluationStopped(stop, self.state.directory, self.calls, part="adaptive-attack")


def forward_to_children(launcher: Any) -> Callable[[int], None] | None:
    """A ``forward`` for :class:`StopSignals` that passes a signal on to the processes a
    Lightning launcher started (none in one process)."""
    if launcher is None or not hasattr(launcher, "kill"):
        return None
    return lambda signum: launcher.kill(signum)

