"""Seeded patient-wise splits: no patient's images in two splits, for every data set without an
official split (or for the part of it an official split leaves to draw: NIH's validation split,
CheXpert's and Google's training and validation splits)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def patient_split(metadata: pd.DataFrame, fractions: dict[str, float], seed: int) -> dict[str, list[str]]:
    """Split images patient-wise so each split gets about ``fractions`` of the images.

    Patients are shuffled with ``seed`` and each goes, with all its images, to
    the split furthest below its target image count; no patient is in two
    splits. Image lists keep the order of ``metadata``.
    """
    for column in ("image", "patient_id"):
        if column not in metadata.columns:
            raise ValueError(f"patient_split: metadata needs an {column!r} column, has {list(metadata.columns)}")
    if not fractions or any(f < 0 for f in fractions.values()) or not math.isclose(sum(fractions.values()), 1.0, abs_tol=1e-6):
        raise ValueError(f"patient_split: fractions must be >= 0 and sum to 1, got {fractions}")
    per_patient = metadata.groupby("patient_id", sort=True).size()
    order = np.random.default_rng(seed).permutation(len(per_patient))
    total = len(metadata)
    names = [s for s, f in fractions.items() if f > 0]  # a zero-fraction split gets nothing
    deficit = np.array([fractions[s] * total for s in names])
    assigned: dict[str, str] = {}
    for k in order:
        j = int(np.argmax(deficit))
        assigned[per_patient.index[k]] = names[j]
        deficit[j] -= per_patient.iloc[k]
    split_of = metadata["patient_id"].map(assigned).to_numpy()
    images = metadata["image"].to_numpy()
    return {s: images[split_of == s].tolist() for s in fractions}
