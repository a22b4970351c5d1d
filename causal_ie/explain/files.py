"""Explaining a researcher's own image files: ``python -m causal_ie.explain input=PATH``.

Each file (PNG, JPEG, DICOM; :func:`causal_ie.data.images.read_image`) is resized to the
model's input size, and gets the model's probability for each of its labels, a CE map per
label ([K, H, W] at that size) and one CAM of its most likely label. Per label the map's
strongest region (:func:`strongest_region`) is reported as a box in the input file's own
pixels, with its effect. The run directory gets ``explanations.json``, ``maps.npz`` and
``figures/<stem>.png`` (:func:`causal_ie.explain.figures.plot_explanation`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from skimage.measure import label as label_components
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from causal_ie.data.errors import DataError
from causal_ie.data.images import IMAGE_SUFFIXES, is_dicom, read_image
from causal_ie.explain.explainers import Explainer
from causal_ie.explain.figures import plot_explanation
from causal_ie.io import atomic_open, atomic_write_json
from causal_ie.labels import model_labels
from causal_ie.precision import full_precision
from causal_ie.runtime import model_device

log = logging.getLogger(__name__)

EXPLANATIONS_FILE, MAPS_FILE = "explanations.json", "maps.npz"
ON_ERROR = ("raise", "skip")


def input_files(path: str | Path) -> list[Path]:
    """``path`` itself, or the image files in the folder ``path`` (by suffix, or DICOMs without
    one), sorted. FileNotFoundError / ValueError naming ``input=`` when there are none."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input={str(path)!r} does not exist; expected an image file (PNG, JPEG, DICOM) or a folder of them")
    if path.is_file():
        return [path]
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and not p.name.startswith(".") and (p.suffix.lower() in IMAGE_SUFFIXES or (not p.suffix and is_dicom(p)))
    )
    if not files:
        raise ValueError(f"input={str(path)!r} is an empty folder: it holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def input_size(classifier: nn.Module, image_size: int | None) -> int:
    """The side the images are explained at: ``image_size``, else the size the model was
    trained at, else the resolution a model that resizes itself (``model=xrv``) runs at."""
    if image_size is not None:
        return int(image_size)
    size = classifier.hparams.get("image_size") or getattr(classifier, "input_resolution", None)
    if size is None:
        raise ValueError(f"{classifier.hparams.backbone} records no input size: set image_size=")
    return int(size)


def strongest_region(effect: np.ndarray, threshold: float = 0.5) -> tuple[tuple[int, int, int, int], float, float]:
    """The region of ``effect`` [H, W] around its maximum: the 8-connected pixels that hold
    at least ``threshold`` of the maximum and touch the peak. Returns the box ``(x, y, w, h)``
    in map pixels (whole pixels: a one-pixel peak is 1 x 1), the peak's effect and the mean
    effect inside the box. A map without a positive value gives the box of its peak pixel."""
    peak = np.unravel_index(int(np.argmax(effect)), effect.shape)
    top = float(effect[peak])
    if top > 0:
        components = label_components(effect >= threshold * top, connectivity=2)
        rows, cols = np.nonzero(components == components[peak])
    else:
        rows, cols = np.array([peak[0]]), np.array([peak[1]])
    y0, y1, x0, x1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    return (x0, y0, x1 - x0, y1 - y0), top, float(effect[y0:y1, x0:x1].mean())


def to_file_pixels(box: Sequence[float], map_size: tuple[int, int], file_size: tuple[int, int]) -> list[float]:
    """A box ``(x, y, w, h)`` in pixels of a [H, W] map, in pixels of the [H', W'] file it was resized from."""
    sy, sx = file_size[0] / map_size[0], file_size[1] / map_size[1]
    x, y, w, h = box
    return [x * sx, y * sy, w * sx, h * sy]


class FileExplainer:
    """Explains image files with a classifier, a CE explainer and optionally one CAM.

    Args:
        classifier: [N, 1, S, S] images in [0, 1] -> one logit per label (its ``labels``).
        ce: the CE explainer (``mask`` config).
        cam: the CAM of each image's most likely label, or None.
        image_size: the side S the files are resized to (:func:`input_size`).
        top_labels: how many of the most likely labels the figure shows.
        region_threshold: a label's box holds the pixels with at least this share of its peak effect.
        voi_lut: apply a DICOM's VOI LUT / window when reading it.
    """

    def __init__(self, classifier: nn.Module, ce: Explainer, cam: Explainer | None, image_size: int,
                 top_labels: int = 3, region_threshold: float = 0.5, voi_lut: bool = False):
        if top_labels < 1:
            raise ValueError(f"top_labels must be >= 1, got {top_labels}")
        if not 0 < region_threshold <= 1:
            raise ValueError(f"region_threshold must be in (0, 1], got {region_threshold}")
        self.classifier = classifier.eval()
        self.labels = model_labels(classifier)
        self.ce, self.cam = ce, cam
        self.image_size, self.top_labels = int(image_size), int(top_labels)
        self.region_threshold, self.voi_lut = float(region_threshold), bool(voi_lut)

    def prepare(self, pixels: np.ndarray) -> Tensor:
        """[H, W] pixels in [0, 1] -> a [1, 1, S, S] batch (bilinear, antialiased as torchxrayvision resizes)."""
        x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None, None]
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False)
        return x.clamp(0, 1).to(model_device(self.classifier))

    def explain(self, path: Path) -> tuple[dict[str, Any], np.ndarray, dict[str, Any]]:
        """One file: its record for explanations.json, its CE maps [K, S, S] and what its figure shows."""
        pixels = read_image(path, voi_lut=self.voi_lut)
        x = self.prepare(pixels)
        with torch.no_grad(), full_precision(x.device):
            probs = self.classifier(x).sigmoid()[0].float().cpu()
        maps = self.ce.all_findings(self.classifier, x)[0].detach().float().cpu().numpy()
        if maps.shape[0] not in (1, len(self.labels)):
            raise ValueError(f"the CE explainer gave {maps.shape[0]} maps for {len(self.labels)} labels")
        maps = np.broadcast_to(maps, (len(self.labels), *maps.shape[1:])) if maps.shape[0] == 1 else maps
        labels = {}
        for k, name in enumerate(self.labels.names):
            box, effect, mean = strongest_region(maps[k], self.region_threshold)
            labels[name] = {"probability": float(probs[k]), "box": to_file_pixels(box, maps.shape[1:], pixels.shape),
                            "effect": effect, "box_mean_effect": mean}
        order = [int(k) for k in torch.argsort(probs, descending=True, stable=True)[: self.top_labels]]
        record = {"file": str(path), "height": int(pixels.shape[0]), "width": int(pixels.shape[1]),
                  "top_labels": [self.labels.names[k] for k in order], "labels": labels}
        figure = {"image": x[0, 0].cpu().numpy(), "maps": [(self.labels.names[k], float(probs[k]), maps[k]) for k in order]}
        if self.cam is not None:
            cam = self.cam(self.classifier, x, torch.tensor([0]), torch.tensor([order[0]]))[0]
            figure["cam"] = (getattr(self.cam, "method", self.cam.kind), self.labels.names[order[0]], float(probs[order[0]]), cam.detach().float().cpu().numpy())
        return record, maps, figure


def explain_files(explainer: FileExplainer, files: Sequence[Path], out_dir: Path, on_error: str = "raise",
                  run: dict[str, Any] | None = None) -> dict[str, Any]:
    """Explain ``files`` into ``out_dir`` (explanations.json, maps.npz, figures/<stem>.png).

    ``on_error=raise`` stops at the first unreadable file (DataError naming it); ``skip`` lists
    it under ``skipped`` with the reason and goes on. Returns the explanations.json content."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}; expected one of {ON_ERROR}")
    out_dir = Path(out_dir)
    images, skipped, arrays, stems = [], [], {}, set()
    for path in tqdm(files, desc="explaining", unit="image"):
        try:
            record, maps, figure = explainer.explain(path)
        except DataError as err:
            if on_error == "raise":
                raise
            log.warning("skipped: %s", err)
            skipped.append({"file": str(path), "reason": str(err)})
            continue
        stem = _unique_stem(path, stems)
        record["key"] = stem
        record["figure"] = str(Path("figures") / f"{stem}.png")
        plot_explanation(figure, out_dir / record["figure"])
        arrays[stem] = maps.astype(np.float32)
        images.append(record)
    results = {"run": {**(run or {}), "labels": list(explainer.labels.names), "image_size": explainer.image_size,
                       "files": len(files), "explained": len(images), "skipped": len(skipped)},
               "images": images, "skipped": skipped}
    with atomic_open(out_dir / MAPS_FILE, "wb") as f:
        np.savez_compressed(f, labels=np.array(explainer.labels.names), **arrays)
    atomic_write_json(out_dir / EXPLANATIONS_FILE, results)
    return results


def _unique_stem(path: Path, taken: set[str]) -> str:
    """The file's stem, numbered when two files share it (a folder tree of ``image.dcm``)."""
    stem, n = path.stem or path.name, 1
    while stem in taken:
        n += 1
        stem = f"{path.stem or path.name}_{n}"
    taken.add(stem)
    return stem
