"""Per-item rows of numbers as a torchmetrics state, gathered across processes.

Intervals need per-item values (one per image, or per image-finding pair) and the
patient each came from, not just the sums torchmetrics metrics keep. Under DDP each
process appends its shard's rows and ``compute`` concatenates every process's rows;
patient and image ids travel as :func:`group_code` numbers inside them.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor
from torchmetrics import Metric


def group_code(name: str) -> int:
    """A stable integer for an id (patient or image), so it travels as a number between
    processes (48 bits: exact in float64 rows)."""
    return int.from_bytes(hashlib.blake2b(str(name).encode(), digest_size=6).digest(), "little")


def patient_codes(batch: dict, device: torch.device | None = None) -> Tensor:
    """float64 [B]: the :func:`group_code` of each image's patient (an image without a patient
    id is its own patient)."""
    ids = batch["id"]
    patients = [p or i for p, i in zip(batch.get("patient_id", ids), ids)]
    return torch.tensor([float(group_code(p)) for p in patients], dtype=torch.float64, device=device)


class Rows(Metric):
    """Rows [N, F] (float64), concatenated over batches and, on ``compute``, processes."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("rows", default=[], dist_reduce_fx="cat")

    def update(self, rows: Tensor) -> None:
        self.rows.append(rows.double())

    def compute(self) -> Tensor:
        if isinstance(self.rows, Tensor):  # already concatenated by the sync
            return self.rows
        return torch.cat(self.rows) if self.rows else torch.zeros(0, 0, dtype=torch.float64)
