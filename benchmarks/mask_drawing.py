"""What drawing the ground truth costs per item: a DICOM source's item with its per-label masks
(and their boxes) against the same item without, at 224 px, one thread, on the tests' fixture
folders (real rows torchxrayvision ships over written DICOMs; items with ground truth only).

    python benchmarks/mask_drawing.py

The reason training items carry no masks by default (``data.train_masks=false``). Results to
benchmarks/results/mask_drawing.json and .md (atomically).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import rsna_fixtures  # noqa: E402
import siim_fixtures  # noqa: E402
import vindr_fixtures  # noqa: E402
from dicom_fixtures import source_datamodule  # noqa: E402

from causal_ie.data.sources import RSNADataModule, SIIMDataModule, VinDrDataModule  # noqa: E402
from causal_ie.io import atomic_write_text  # noqa: E402
from causal_ie.outputs.tables import markdown_table  # noqa: E402

REPEATS = 20


def per_item_ms(dm, ids: list[str]) -> dict[str, float]:
    ds = dm.dataset("train")
    idx = [ds.ids.index(i) for i in ids]
    out = {}
    for label, draw in (("with_masks_ms", True), ("without_ms", False)):
        ds.draw = draw
        ds[idx[0]]  # warm the memmap pages
        started = time.perf_counter()
        for _ in range(REPEATS):
            for i in idx:
                ds[i]
        out[label] = (time.perf_counter() - started) / (REPEATS * len(idx)) * 1e3
    out["ratio"] = out["with_masks_ms"] / out["without_ms"]
    out["items"] = len(idx)
    return out


def main() -> None:
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = vindr_fixtures.shipped_rows()
        ids = vindr_fixtures.pick_images(rows, 6, 0)
        root = vindr_fixtures.make_vindr_root(tmp / "vindr", ids, rows=rows)
        results["vindr"] = per_item_ms(source_datamodule(VinDrDataModule, root, tmp / "vindr", image_size=224), ids)
        rows = siim_fixtures.shipped_rows()
        ids = siim_fixtures.pick_images(rows, [1, 2, 3, 4], 0)
        root = siim_fixtures.make_siim_root(tmp / "siim", ids, rows=rows)
        results["siim"] = per_item_ms(source_datamodule(SIIMDataModule, root, tmp / "siim", image_size=224), ids)
        rows = rsna_fixtures.shipped_rows()
        ids = rsna_fixtures.pick_images(rows, [1, 2, 3, 4], 0)
        root = rsna_fixtures.make_rsna_root(tmp / "rsna", ids, rows=rows)
        results["rsna"] = per_item_ms(source_datamodule(RSNADataModule, root, tmp / "rsna", image_size=224), ids)
    out = ROOT / "benchmarks" / "results"
    atomic_write_text(out / "mask_drawing.json", json.dumps(results, indent=2) + "\n")
    md = ("# Drawing the ground truth per item (224 px, 1 thread)\n\n"
          + markdown_table(["source", "items", "with masks (ms)", "without (ms)", "ratio"],
                           [[k, v["items"], f"{v['with_masks_ms']:.2f}", f"{v['without_ms']:.3f}", f"{v['ratio']:.0f}x"]
                            for k, v in results.items()]) + "\n")
    atomic_write_text(out / "mask_drawing.md", md)
    print(md)


if __name__ == "__main__":
    main()
