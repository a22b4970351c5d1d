"""SyntheticCXR: procedural chest radiographs whose findings sit in known boxes.

Every image is drawn on the fly from ``(seed, index)``: nothing is stored and
any size can be asked for. An image has a body, two lung fields with vessel
markings, ribs, a spine, mediastinum and heart; each present finding adds its
own local signature (nodule: small dense blob, effusion: basal opacity with a
meniscus, pneumothorax: a peripheral area without lung markings behind a
pleural line, ...) inside a box that is returned with the sample.

Each finding draws from its own random stream and touches only pixels inside
its box, and the global contrast change and noise are pointwise: rendering
the same index with one finding switched off changes nothing outside that
finding's box. The lesion boxes are therefore the true causal regions, which
is what the CE tests and the localisation metrics rely on.

Optional shortcut (``spurious``): a marker (a bright corner tag, or a
chest-drain-like tube) that agrees with the presence of one finding with
probability ``p``; samples then carry its box as ``spurious_box``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from causal_ie.data.findings import FINDINGS, NUM_FINDINGS, finding_index

MARKER_KINDS = ("tag", "tube")


@dataclass(frozen=True)
class Anatomy:
    """Per-image anatomy in normalised coordinates (x to the right, y down, both in [0,1])."""

    lungs: tuple[tuple[float, float, float, float], ...]  # (cx, cy, ax, ay) for each lung
    heart: tuple[float, float, float, float]
    rib_phase: float
    rib_period: float
    marking_phase: float


class Canvas:
    """Pixel-centre coordinates of an S x S image and smooth shape helpers."""

    def __init__(self, size: int):
        self.size = size
        c = (np.arange(size, dtype=np.float32) + 0.5) / size
        self.x = c[None, :].repeat(size, 0)
        self.y = c[:, None].repeat(size, 1)
        self.edge = 1.0 / size  # one pixel, for anti-aliased edges

    def ellipse(self, cx, cy, ax, ay, soft=1.0) -> np.ndarray:
        """1 inside the ellipse, 0 outside, ``soft`` pixels of smooth edge."""
        r = np.sqrt(((self.x - cx) / ax) ** 2 + ((self.y - cy) / ay) ** 2)
        return _sigmoid((1.0 - r) * min(ax, ay) / (soft * self.edge))

    def gaussian(self, cx, cy, sx, sy) -> np.ndarray:
        return np.exp(-0.5 * (((self.x - cx) / sx) ** 2 + ((self.y - cy) / sy) ** 2))

    def box_mask(self, box: np.ndarray) -> np.ndarray:
        """1 for pixels whose centre lies in box (x0, y0, x1, y1), else 0."""
        x0, y0, x1, y1 = box
        return ((self.x >= x0) & (self.x < x1) & (self.y >= y0) & (self.y < y1)).astype(np.float32)


def _sigmoid(t: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(t, -30, 30)))


def _pick_lung(anatomy: Anatomy, rng: np.random.Generator) -> tuple[float, float, float, float]:
    return anatomy.lungs[int(rng.integers(2))]


def _lateral(lung: tuple[float, float, float, float]) -> float:
    """+1 when the lung's outer (lateral) side is to the right of the image."""
    return 1.0 if lung[0] > 0.5 else -1.0


# -- finding signatures ------------------------------------------------------
# Each takes (canvas, anatomy, rng) and returns (additive layer, box (x0,y0,x1,y1)
# normalised) or for `replace` kinds a callable; the caller cuts the layer to the box.


def _atelectasis(cv, an, rng):
    cx, cy, ax, ay = _pick_lung(an, rng)
    yc = cy + ay * rng.uniform(0.25, 0.5)
    xc = cx + rng.uniform(-0.2, 0.2) * ax
    length, thick, tilt = rng.uniform(0.16, 0.22), rng.uniform(0.022, 0.03), rng.uniform(-0.25, 0.25)
    # A plate-like band: thin across, long along a slightly tilted line.
    u = (cv.x - xc) * np.cos(tilt) + (cv.y - yc) * np.sin(tilt)
    v = -(cv.x - xc) * np.sin(tilt) + (cv.y - yc) * np.cos(tilt)
    layer = 0.4 * _sigmoid((length / 2 - np.abs(u)) / cv.edge) * np.exp(-0.5 * (v / (thick / 2)) ** 2)
    half = length / 2 + 2 * thick
    return layer, (xc - half, yc - half * 0.5 - thick, xc + half, yc + half * 0.5 + thick)


def _cardiomegaly(cv, an, rng):
    cx, cy, ax, ay = an.heart
    grow = rng.uniform(1.45, 1.65)
    ax2, ay2 = ax * grow, ay * rng.uniform(1.1, 1.25)
    cx2 = cx + (ax2 - ax) * 0.3
    # The enlarged heart shadow: as bright as the heart, over what was lung.
    layer = 0.58 * cv.ellipse(cx2, cy, ax2, ay2, soft=1.5)
    pad = 4 * cv.edge
    return ("max", layer), (cx2 - ax2 - pad, cy - ay2 - pad, cx2 + ax2 + pad, cy + ay2 + pad)


def _effusion(cv, an, rng):
    lung = _pick_lung(an, rng)
    cx, cy, ax, ay = lung
    side = _lateral(lung)
    level = cy + ay * rng.uniform(0.35, 0.55)
    # Meniscus: the fluid line climbs towards the lateral chest wall.
    rise = rng.uniform(0.06, 0.1)
    surface = level - rise * _sigmoid(side * (cv.x - cx) / (0.4 * ax))
    layer = 0.45 * _sigmoid((cv.y - surface) / (1.2 * cv.edge)) * cv.ellipse(cx, cy, ax * 1.05, ay * 1.05, soft=2)
    pad = 5 * cv.edge
    return layer, (cx - ax * 1.05 - pad, level - rise - pad, cx + ax * 1.05 + pad, cy + ay * 1.05 + pad)


def _infiltration(cv, an, rng):
    cx, cy, ax, ay = _pick_lung(an, rng)
    bx, by = cx + rng.uniform(-0.3, 0.3) * ax, cy + rng.uniform(-0.3, 0.2) * ay
    half = rng.uniform(0.08, 0.1)
    layer = np.zeros_like(cv.x)
    # Patchy, ill-defined: many small faint blobs scattered over an area.
    reach = 0.6 * half + 2.5 * 0.025
    for _ in range(int(rng.integers(7, 11))):
        px, py = bx + rng.uniform(-0.6, 0.6) * half, by + rng.uniform(-0.6, 0.6) * half
        s = rng.uniform(0.015, 0.025)
        layer += rng.uniform(0.12, 0.2) * cv.gaussian(px, py, s, s)
    return layer, (bx - reach, by - reach, bx + reach, by + reach)


def _blob(cv, an, rng, radius, amp):
    cx, cy, ax, ay = _pick_lung(an, rng)
    r = rng.uniform(*radius)
    bx = cx + rng.uniform(-0.45, 0.45) * ax
    by = cy + rng.uniform(-0.5, 0.4) * ay
    layer = amp * cv.ellipse(bx, by, r, r * rng.uniform(0.85, 1.15), soft=0.8)
    pad = r * 1.15 + 3 * cv.edge
    return layer, (bx - pad, by - pad, bx + pad, by + pad)


def _mass(cv, an, rng):
    return _blob(cv, an, rng, (0.07, 0.095), 0.45)


def _nodule(cv, an, rng):
    return _blob(cv, an, rng, (0.03, 0.04), 0.55)


def _pneumonia(cv, an, rng):
    cx, cy, ax, ay = _pick_lung(an, rng)
    bx, by = cx + rng.uniform(-0.3, 0.3) * ax, cy + ay * rng.uniform(0.0, 0.35)
    s = rng.uniform(0.045, 0.06)
    # Soft-edged opacity with mottled texture (air bronchograms as dark streaks).
    mottle = 0.75 + 0.25 * np.sin(cv.x * 90 * (1 + rng.uniform(0, 0.3)) + rng.uniform(0, 6)) * np.sin(cv.y * 70 + rng.uniform(0, 6))
    layer = 0.4 * cv.gaussian(bx, by, s, s * 1.2) * mottle
    return layer, (bx - 2.6 * s, by - 3.1 * s, bx + 2.6 * s, by + 3.1 * s)


def _pneumothorax(cv, an, rng):
    lung = _pick_lung(an, rng)
    cx, cy, ax, ay = lung
    side = _lateral(lung)
    # Apical-lateral crescent of air: lung markings gone, a thin pleural line inside it.
    pcx, pcy = cx + side * 0.2 * ax, cy - 0.45 * ay
    inner = cv.ellipse(pcx - side * 0.25 * ax, pcy + 0.15 * ay, ax * 0.8, ay * 0.6, soft=1)
    outer = cv.ellipse(cx, cy, ax, ay, soft=1)
    region = outer * (1 - inner)
    region *= (cv.y < cy + 0.05).astype(np.float32)
    line = cv.ellipse(pcx - side * 0.25 * ax, pcy + 0.15 * ay, ax * 0.8 + 1.5 * cv.edge, ay * 0.6 + 1.5 * cv.edge, soft=0.7) - inner
    box = (cx - ax, cy - ay, cx + ax, cy + 0.05)

    def apply(img: np.ndarray, markings: np.ndarray) -> np.ndarray:
        return img - region * (markings + 0.12) + 0.4 * np.clip(line, 0, 1) * outer

    return ("replace", apply), box


def _consolidation(cv, an, rng):
    cx, cy, ax, ay = _pick_lung(an, rng)
    bx, by = cx + rng.uniform(-0.25, 0.25) * ax, cy + ay * rng.uniform(0.05, 0.45)
    hx, hy = rng.uniform(0.06, 0.08), rng.uniform(0.05, 0.07)
    # Homogeneous and sharply bounded (a lobe-like superellipse).
    r = (np.abs((cv.x - bx) / hx) ** 4 + np.abs((cv.y - by) / hy) ** 4) ** 0.25
    layer = 0.38 * _sigmoid((1 - r) * min(hx, hy) / (0.7 * cv.edge))
    pad = 3 * cv.edge
    return layer, (bx - hx - pad, by - hy - pad, bx + hx + pad, by + hy + pad)


def _edema(cv, an, rng):
    (lx, ly, lax, lay), (rx, ry, rax, ray) = an.lungs
    hy = (ly + ry) / 2 - rng.uniform(0.0, 0.04)
    s = rng.uniform(0.05, 0.065)
    # Bilateral perihilar ("bat wing") haze.
    left = cv.gaussian(lx + 0.35 * lax, hy, s, s * 1.5)
    right = cv.gaussian(rx - 0.35 * rax, hy, s, s * 1.5)
    layer = 0.38 * (left + right)
    x0, x1 = lx + 0.35 * lax - 2.5 * s, rx - 0.35 * rax + 2.5 * s
    return layer, (x0, hy - 3.6 * s, x1, hy + 3.6 * s)


def _emphysema(cv, an, rng):
    cx, cy, ax, ay = _pick_lung(an, rng)
    bx, by = cx + rng.uniform(-0.2, 0.2) * ax, cy - ay * rng.uniform(0.35, 0.5)
    half = 0.085
    layer = np.zeros_like(cv.x)
    # Bullae: thin-walled lucent rings.
    for _ in range(int(rng.integers(2, 4))):
        r = rng.uniform(0.025, 0.04)
        px, py = bx + rng.uniform(-0.5, 0.5) * (half - r), by + rng.uniform(-0.5, 0.5) * (half - r)
        disk = cv.ellipse(px, py, r, r, soft=0.6)
        ring = cv.ellipse(px, py, r + 1.2 * cv.edge, r + 1.2 * cv.edge, soft=0.6) - disk
        layer += 0.3 * ring - 0.15 * disk
    return layer, (bx - half, by - half, bx + half, by + half)


def _fibrosis(cv, an, rng):
    lung = _pick_lung(an, rng)
    cx, cy, ax, ay = lung
    side = _lateral(lung)
    bx, by = cx + side * 0.45 * ax, cy + ay * rng.uniform(0.15, 0.4)
    half = rng.uniform(0.07, 0.09)
    # Lines about 0.055 apart, but never closer than 3 pixels (else they alias away).
    f = min(rng.uniform(100, 120), 2 * np.pi / (3 * cv.edge))
    # Reticular (net-like) pattern of fine lines.
    net = np.maximum(np.cos(f * (cv.x - bx)), np.cos(f * (cv.y - by) + rng.uniform(0, 3))) ** 8
    layer = 0.4 * net * cv.gaussian(bx, by, half * 0.45, half * 0.45)
    return layer, (bx - half, by - half, bx + half, by + half)


def _pleural_thickening(cv, an, rng):
    lung = _pick_lung(an, rng)
    cx, cy, ax, ay = lung
    side = _lateral(lung)
    y0, y1 = cy - ay * rng.uniform(0.4, 0.6), cy + ay * rng.uniform(0.0, 0.25)
    thick = rng.uniform(0.025, 0.035)
    wall = cx + side * ax * 0.95  # lateral lung border
    xs = wall - side * thick / 2
    band = _sigmoid((thick / 2 - np.abs(cv.x - xs)) / (0.6 * cv.edge))
    band *= _sigmoid((cv.y - y0) / cv.edge) * _sigmoid((y1 - cv.y) / cv.edge)
    layer = 0.42 * band
    return layer, (xs - thick / 2 - 2 * cv.edge, y0 - 2 * cv.edge, xs + thick / 2 + 2 * cv.edge, y1 + 2 * cv.edge)


def _hernia(cv, an, rng):
    hx, hy, hax, hay = an.heart
    bx, by = 0.5 + rng.uniform(-0.03, 0.03), hy + hay * rng.uniform(0.5, 0.8)
    r = rng.uniform(0.05, 0.065)
    disk = cv.ellipse(bx, by, r, r, soft=0.7)
    # Retrocardiac round shadow with an air-fluid level: dark air above, dense fluid below.
    level = by + rng.uniform(-0.2, 0.2) * r
    layer = disk * np.where(cv.y < level, -0.3, 0.3)
    pad = r + 3 * cv.edge
    return layer, (bx - pad, by - pad, bx + pad, by + pad)


SIGNATURES: dict[str, Callable] = {
    "Atelectasis": _atelectasis,
    "Cardiomegaly": _cardiomegaly,
    "Effusion": _effusion,
    "Infiltration": _infiltration,
    "Mass": _mass,
    "Nodule": _nodule,
    "Pneumonia": _pneumonia,
    "Pneumothorax": _pneumothorax,
    "Consolidation": _consolidation,
    "Edema": _edema,
    "Emphysema": _emphysema,
    "Fibrosis": _fibrosis,
    "Pleural_Thickening": _pleural_thickening,
    "Hernia": _hernia,
}
assert tuple(SIGNATURES) == FINDINGS


class SyntheticCXR(Dataset):
    """Procedural multi-label chest radiographs with a known box per present finding.

    Args:
        num_samples: length of the data set.
        image_size: side S of the square images.
        seed: the data set's seed; item i is a pure function of (seed, i, image_size).
        prevalence: probability of each finding (one float, or 14 of them),
            drawn independently, so images are multi-label.
        spurious: optional shortcut marker ``{"finding": name, "p": 0.9,
            "kind": "tag" | "tube"}``: the marker is present when the finding
            is, and absent when it is not, each with probability ``p``.
        noise: standard deviation of the pixel noise.
        cache_mb: keep rendered items in memory (exactly the same values) while
            the whole data set fits in this many MB; 0 turns caching off.

    An item is ``{"image": float32 [1,S,S] in [0,1], "labels": float32 [14],
    "boxes": float32 [14,4] (x, y, w, h pixels; NaN where absent), "id",
    "patient_id", "spurious_box": float32 [4] (NaN without a marker)}``.
    """

    def __init__(
        self,
        num_samples: int = 1000,
        image_size: int = 64,
        seed: int = 0,
        prevalence: float | Sequence[float] = 0.2,
        spurious: Mapping[str, Any] | None = None,
        noise: float = 0.02,
        cache_mb: float = 512,
    ):
        if int(num_samples) < 0:
            raise ValueError(f"SyntheticCXR: num_samples must be >= 0, got {num_samples}")
        if int(image_size) < 8:
            raise ValueError(f"SyntheticCXR: image_size must be >= 8, got {image_size}")
        prev = np.broadcast_to(np.asarray(prevalence, dtype=np.float64), (NUM_FINDINGS,)).copy()
        if ((prev < 0) | (prev > 1)).any():
            raise ValueError(f"data.synthetic.prevalence must lie in [0, 1], got {prevalence}")
        self.num_samples = int(num_samples)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.prevalence = prev
        self.noise = float(noise)
        self.spurious = self._check_spurious(spurious)
        self.canvas = Canvas(self.image_size)
        fits = self.num_samples * self.image_size**2 * 4 <= cache_mb * 2**20
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = {} if fits else None

    @staticmethod
    def _check_spurious(spurious: Mapping[str, Any] | None) -> dict[str, Any] | None:
        if not spurious:
            return None
        spurious = dict(spurious)
        unknown = set(spurious) - {"finding", "p", "kind"}
        if unknown:
            raise ValueError(f"data.synthetic.spurious: unknown key(s) {sorted(unknown)}; expected finding, p, kind")
        if "finding" not in spurious:
            raise ValueError("data.synthetic.spurious needs `finding` (one of FINDINGS)")
        spurious["index"] = finding_index(spurious["finding"])
        spurious["p"] = float(spurious.get("p", 0.9))
        if not 0 <= spurious["p"] <= 1:
            raise ValueError(f"data.synthetic.spurious.p must lie in [0, 1], got {spurious['p']}")
        spurious["kind"] = spurious.get("kind", "tag")
        if spurious["kind"] not in MARKER_KINDS:
            raise ValueError(f"data.synthetic.spurious.kind must be one of {MARKER_KINDS}, got {spurious['kind']!r}")
        return spurious

    def __len__(self) -> int:
        return self.num_samples

    # -- random streams ------------------------------------------------------
    def _streams(self, index: int) -> list[np.random.Generator]:
        """Independent streams: labels, anatomy, 14 findings, marker, noise."""
        children = np.random.SeedSequence([self.seed, int(index)]).spawn(NUM_FINDINGS + 4)
        return [np.random.default_rng(c) for c in children]

    def labels_of(self, index: int) -> np.ndarray:
        """The 0/1 labels of item ``index`` (cheap: no rendering)."""
        rng = self._streams(index)[0]
        return (rng.random(NUM_FINDINGS) < self.prevalence).astype(np.float32)

    def label_matrix(self) -> np.ndarray:
        return np.stack([self.labels_of(i) for i in range(len(self))]) if len(self) else np.zeros((0, NUM_FINDINGS), np.float32)

    def has_marker(self, index: int, labels: np.ndarray | None = None) -> bool:
        if self.spurious is None:
            return False
        labels = self.labels_of(index) if labels is None else labels
        agree = self._streams(index)[NUM_FINDINGS + 2].random() < self.spurious["p"]
        present = bool(labels[self.spurious["index"]] > 0.5)
        return present if agree else not present

    # -- rendering -------------------------------------------------------------
    def _anatomy(self, rng: np.random.Generator) -> Anatomy:
        dx, dy, scale = rng.uniform(-0.02, 0.02), rng.uniform(-0.02, 0.02), rng.uniform(0.95, 1.05)
        ax, ay = 0.15 * scale, 0.29 * scale
        lungs = (
            (0.5 - 0.18 * scale + dx, 0.45 + dy, ax, ay),
            (0.5 + 0.18 * scale + dx, 0.45 + dy, ax, ay),
        )
        heart = (0.53 + dx, 0.63 + dy, 0.12 * scale * rng.uniform(0.95, 1.05), 0.09 * scale)
        return Anatomy(lungs, heart, rng.uniform(0, 2 * np.pi), rng.uniform(0.075, 0.09), rng.uniform(0, 2 * np.pi))

    def render(self, index: int, labels: np.ndarray | None = None, marker: bool | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Image [S,S] float32 in [0,1], boxes [14,4] (x,y,w,h px), marker box [4].

        ``labels``/``marker`` override the drawn ones (everything else unchanged),
        which is how tests check that a finding only changes its own box.
        """
        streams = self._streams(index)
        labels = self.labels_of(index) if labels is None else np.asarray(labels, dtype=np.float32)
        marker = self.has_marker(index, labels) if marker is None else bool(marker)
        cv, S = self.canvas, self.image_size
        anatomy = self._anatomy(streams[1])
        global_rng = streams[1]
        contrast, offset = global_rng.uniform(0.9, 1.1), global_rng.uniform(-0.04, 0.04)

        body = cv.ellipse(0.5, 0.55, 0.44, 0.52, soft=2)
        img = 0.08 + 0.42 * body
        lung_mask = np.zeros_like(img)
        for cx, cy, ax, ay in anatomy.lungs:
            lung_mask = np.maximum(lung_mask, cv.ellipse(cx, cy, ax, ay, soft=1.5))
        img -= 0.28 * lung_mask
        # Vessel markings fan out from the hila.
        markings = np.zeros_like(img)
        for cx, cy, ax, ay in anatomy.lungs:
            hx = cx - _lateral((cx, cy, ax, ay)) * 0.7 * ax
            theta = np.arctan2(cv.y - cy, cv.x - hx)
            dist = np.hypot(cv.x - hx, cv.y - cy)
            markings += 0.07 * (0.5 + 0.5 * np.cos(14 * theta + anatomy.marking_phase + 6 * dist)) ** 6 * np.exp(-dist / 0.25)
        markings *= lung_mask
        img += markings
        # Ribs: bright curved bands over the chest.
        ribs = (0.5 + 0.5 * np.cos(2 * np.pi * (cv.y + 0.6 * (cv.x - 0.5) ** 2) / anatomy.rib_period + anatomy.rib_phase)) ** 4
        img += 0.07 * ribs * body * (cv.y < 0.85)
        # Mediastinum, spine and heart.
        img = np.maximum(img, 0.5 * cv.ellipse(0.5, 0.4, 0.06, 0.32, soft=2))
        img = np.maximum(img, 0.55 * cv.ellipse(*anatomy.heart, soft=1.5))
        img += 0.06 * cv.ellipse(0.5, 0.55, 0.03, 0.5, soft=1)

        boxes = np.full((NUM_FINDINGS, 4), np.nan, np.float32)
        for k, name in enumerate(FINDINGS):
            rng = streams[2 + k]
            layer, box = SIGNATURES[name](cv, anatomy, rng)  # always drawn: streams stay aligned
            if labels[k] < 0.5:
                continue
            box = np.clip(np.asarray(box, dtype=np.float32), 0.0, 1.0)
            inside = cv.box_mask(box)
            if isinstance(layer, tuple) and layer[0] == "max":
                img = np.where(inside > 0, np.maximum(img, layer[1]), img)
            elif isinstance(layer, tuple) and layer[0] == "replace":
                img = np.where(inside > 0, layer[1](img, markings), img)
            else:
                img = np.where(inside > 0, img + layer, img)
            img = img.astype(np.float32)  # same dtype either way: no rounding differences elsewhere
            boxes[k] = self._pixel_box(box, inside)

        marker_box = np.full(4, np.nan, np.float32)
        if marker and self.spurious is not None:
            img, mbox = self._draw_marker(img, streams[NUM_FINDINGS + 3])
            marker_box = self._pixel_box(mbox, cv.box_mask(mbox))

        noise = streams[NUM_FINDINGS + 1].normal(0.0, self.noise, size=img.shape).astype(np.float32)
        img = np.clip(contrast * img + offset + noise, 0.0, 1.0).astype(np.float32)
        return img, boxes, marker_box

    def _pixel_box(self, box: np.ndarray, inside: np.ndarray) -> np.ndarray:
        """The box in pixels, snapped to the pixels it covers (so it holds all drawn pixels)."""
        S = self.image_size
        rows, cols = np.nonzero(inside)
        if rows.size == 0:  # smaller than a pixel at this size: keep the nearest pixel
            c, r = min(int(box[0] * S), S - 1), min(int(box[1] * S), S - 1)
            return np.array([c, r, 1, 1], np.float32)
        return np.array([cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1], np.float32)

    def _draw_marker(self, img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        cv = self.canvas
        if self.spurious["kind"] == "tag":
            # A bright "L"-style tag in the top-left corner, outside the body.
            x0, y0 = rng.uniform(0.03, 0.06), rng.uniform(0.03, 0.06)
            w, h = 0.12, 0.08
            box = np.array([x0, y0, x0 + w, y0 + h], np.float32)
            tag = cv.box_mask(box)
            bar = cv.box_mask(np.array([x0 + 0.03, y0 + 0.025, x0 + w - 0.02, y0 + 0.05], np.float32))
            img = np.where(tag > 0, 0.95 - 0.6 * bar, img)
            return img, box
        # "tube": a chest-drain-like bright curved line entering from the right edge.
        y_entry = rng.uniform(0.55, 0.7)
        t = np.clip((0.97 - cv.x) / 0.3, 0, 1)
        path_y = y_entry - 0.25 * t**2
        line = np.exp(-0.5 * ((cv.y - path_y) / (0.8 * cv.edge)) ** 2) * (cv.x > 0.67) * (cv.x < 0.97)
        box = np.array([0.66, y_entry - 0.25 - 0.03, 0.98, y_entry + 0.03], np.float32)
        img = np.where(cv.box_mask(box) > 0, np.maximum(img, 0.9 * line), img)
        return img, box

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"SyntheticCXR index {index} out of range for {len(self)} samples")
        index = int(index) % len(self)
        labels = self.labels_of(index)
        if self._cache is not None and index in self._cache:
            image, boxes, marker_box = self._cache[index]
        else:
            image, boxes, marker_box = self.render(index, labels)
            if self._cache is not None:
                self._cache[index] = (image, boxes, marker_box)
        name = f"synthetic-{self.seed}-{index}"
        return {
            "image": torch.from_numpy(image.copy())[None],
            "labels": torch.from_numpy(labels),
            "boxes": torch.from_numpy(boxes.copy()),
            "id": name,
            "patient_id": name,
            "spurious_box": torch.from_numpy(marker_box.copy()),
        }
