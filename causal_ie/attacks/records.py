"""The attack study's per-image records: named columns of numbers, one row per attacked image.

Each column is named by a tuple (see :data:`Column`):

- ``("id", "index")``: the image's index in the test data set (``dataset[index]`` is the image);
- ``("id", "group")``: a code of its patient (:func:`causal_ie.rows.group_code`; an image
  without a patient id is its own patient), for patient-grouped splits and bootstraps;
- ``("outcome", name)``: the attack's outcome (:data:`causal_ie.attacks.outcome.OUTCOMES`);
- ``("stat", explainer, statistic, side)``: a statistic of the focus finding's map;
- ``("feature", detector, feature, side)``: a detector's feature; ``side`` is ``clean`` or ``adv``.

During the test loop :class:`RecordCollector` (a torchmetrics state, so under DDP every
process appends its shard and ``compute`` gathers them) takes one batch of columns at a time;
its ``compute`` gives :class:`AttackRecords`, what the rest of the study reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from causal_ie.rows import Rows

Column = tuple[str, ...]
SIDES = ("clean", "adv")
PAIRS = ("successful", "changed", "all")

__all__ = ["PAIRS", "SIDES", "AttackRecords", "Column", "RecordCollector"]


class RecordCollector(nn.Module):
    """Collects the columns of each batch; the same names, in the same order, every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = Rows()
        self.names: list[Column] = []

    def update(self, columns: Mapping[Column, Tensor]) -> None:
        names = list(columns)
        if not self.names:
            self.names = names
        elif names != self.names:
            changed = sorted(map(str, set(names) ^ set(self.names)))[:5]
            raise RuntimeError(f"attack records: the columns changed between batches ({', '.join(changed)})")
        device = next(iter(columns.values())).device
        self.rows.update(torch.stack([c.to(device).double().reshape(-1) for c in columns.values()], dim=1))

    def compute(self) -> AttackRecords:
        """Every process's rows (gathered under DDP), then reset for the next epoch."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # a process that saw no image (an empty shard) learns the columns from the others
            names: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(names, self.names)
            self.names = self.names or next((n for n in names if n), [])
        rows = self.rows.compute().cpu().numpy()
        self.rows.reset()
        if rows.size == 0:
            raise RuntimeError("attack evaluation saw no test images")
        return AttackRecords({name: rows[:, j] for j, name in enumerate(self.names)})


@dataclass(frozen=True)
class AttackRecords:
    """One row per attacked image, columns by name (see the module docstring)."""

    columns: Mapping[Column, np.ndarray]

    def __len__(self) -> int:
        return len(self.columns[("id", "index")])

    @property
    def index(self) -> np.ndarray:
        """The images' dataset indices (int64)."""
        return self.columns[("id", "index")].astype(np.int64)

    @property
    def groups(self) -> np.ndarray:
        """The images' patients, as strings (for splits and bootstraps)."""
        return np.array([str(int(g)) for g in self.columns[("id", "group")]])

    def outcome(self, name: str) -> np.ndarray:
        return self.columns[("outcome", name)]

    @property
    def reached_goal(self) -> np.ndarray:
        """Images the attack could change and took to its goal (bool)."""
        return (self.outcome("eligible") > 0) & (self.outcome("success") > 0)

    def pairs(self, kind: str) -> np.ndarray:
        """Which (clean, adversarial) pairs detectors see: ``successful`` (reached the goal),
        ``changed`` (the attack changed the image) or ``all``."""
        if kind == "successful":
            return self.reached_goal
        if kind == "changed":
            return self.outcome("l0") > 0
        if kind == "all":
            return np.ones(len(self), dtype=bool)
        raise ValueError(f"pairs={kind!r}: expected one of {', '.join(PAIRS)}")

    def stat(self, explainer: str, statistic: str, side: str) -> np.ndarray:
        return self.columns[("stat", explainer, statistic, side)]

    def statistics(self, side: str) -> dict[str, np.ndarray]:
        """``{explainer.statistic: values}`` of one side, of the statistics both sides have (the
        figures' histograms)."""
        both = [k for k in self.columns if k[0] == "stat" and k[-1] == "clean"]
        return {f"{k[1]}.{k[2]}": self.columns[(*k[:3], side)] for k in both}

    def feature_names(self, detector: str) -> list[str]:
        return [k[2] for k in self.columns if k[0] == "feature" and k[1] == detector and k[3] == "clean"]

    def features(self, detector: str, side: str, names: Sequence[str] | None = None) -> np.ndarray:
        """The detector's features [N, F] on one side (``names``: a subset, in that order)."""
        names = self.feature_names(detector) if names is None else names
        return np.stack([self.columns[("feature", detector, n, side)] for n in names], axis=1)

    def subset(self, rows: np.ndarray) -> AttackRecords:
        """The records of ``rows`` (a bool mask or integer positions)."""
        return AttackRecords({k: v[rows] for k, v in self.columns.items()})

    def with_side(self, side: str, columns: Mapping[Column, Iterable[float]]) -> AttackRecords:
        """These records with one side's columns replaced (e.g. the features of other
        adversarial images of the same clean images)."""
        out = {k: v for k, v in self.columns.items() if k[-1] != side or k[0] not in ("feature", "stat")}
        out.update({k: np.asarray(v, dtype=np.float64) for k, v in columns.items()})
        return AttackRecords(out)
