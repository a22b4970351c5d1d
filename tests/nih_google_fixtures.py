"""An NIH folder holding some of the images Google re-labelled, with their real rows of the
labels file torchxrayvision ships (``google2019_nih-chest-xray-labels.csv.gz``) and 1024 px
8-bit grayscale PNGs, as the NIH download has them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def shipped_rows() -> pd.DataFrame:
    import torchxrayvision as xrv

    return pd.read_csv(os.path.join(os.path.dirname(xrv.__file__), "data", "google2019_nih-chest-xray-labels.csv.gz"))


def pick_rows(rows: pd.DataFrame, per_set: int) -> pd.DataFrame:
    """The first ``per_set`` rows of each Google set, in file order."""
    return pd.concat([rows[rows["Set Id"] == s].head(per_set) for s in ("val", "test")])


def make_google_root(tmp_path: Path, chosen: pd.DataFrame, *, layout: str = "images",
                     missing: Sequence[str] = ()) -> tuple[Path, Path]:
    """(the NIH folder, its labels CSV of the ``chosen`` rows): a PNG per row but ``missing``,
    under ``images/`` or, with ``layout='tarball'``, ``images_001/images/``."""
    root = tmp_path / "nih"
    folder = root / ("images" if layout == "images" else "images_001/images")
    folder.mkdir(parents=True)
    labels = tmp_path / "google_labels.csv"
    chosen.to_csv(labels, index=False)
    ramp = np.repeat(np.linspace(20, 230, 1024)[:, None], 1024, axis=1).astype(np.uint8)
    for name in chosen["Image Index"]:
        if name not in missing:
            Image.fromarray(ramp, mode="L").save(folder / name)
    return root, labels
