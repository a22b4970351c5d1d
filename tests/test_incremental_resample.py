"""The incremental engine follows ``F.interpolate`` (issue #20): the resampling weights, the changed
box they map, and torchxrayvision models behind XRVClassifier (resize + [-1024, 1024] scaling) at
input sizes other than the network's, all equal to plain forwards within 1e-5."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from causal_ie.interventions import causal_effect
from causal_ie.interventions.incremental import Geometry, IncrementalForward, incremental_support, window_boxes
from causal_ie.interventions.incremental.geometry import ResampleAxis, resample_geometry
from causal_ie.interventions.incremental.rules import Resample
from causal_ie.interventions.spec import InterventionSpec
from causal_ie.interventions.windows import WindowGrid

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5
NETWORK = 64  # the xrv network's input side in these tests (the released weights use 224)


def resampled(x: torch.Tensor, resample: Resample) -> torch.Tensor:
    rows = resample.matrix(x.shape[-2], 0, x.dtype, x.device)
    cols = resample.matrix(x.shape[-1], 1, x.dtype, x.device)
    return rows @ x @ cols.T


@pytest.mark.parametrize(
    "size,scale,mode,align,antialias",
    [
        ((7, 12), None, "bilinear", False, True),  # antialiased downscale, non-integer factors
        ((31, 40), None, "bilinear", False, True),  # antialiased upscale (plain bilinear)
        (None, (2.0, 1.5), "bilinear", True, False),
        ((9, 5), None, "nearest", None, False),
        ((9, 5), None, "nearest-exact", None, False),
        ((11, 13), None, "bicubic", False, True),
        ((6, 7), None, "area", None, False),
    ],
)
def test_resample_weights_equal_interpolate(size, scale, mode, align, antialias):
    x = torch.rand(2, 3, 20, 16, generator=torch.Generator().manual_seed(0))
    resample = Resample(size, scale, mode, align, None, antialias)
    expected = F.interpolate(x, size=size, scale_factor=scale, mode=mode, align_corners=align, antialias=antialias)
    assert torch.allclose(resampled(x, resample), expected, atol=1e-6, rtol=0)


def test_changed_rows_of_an_antialiased_halving_by_hand():
    """8 -> 4 rows, bilinear with antialias: output i weighs input rows 2i-1 .. 2i+2 by 0.25, 0.75,
    0.75, 0.25 over their sum (clipped at the border), so a change in row 3 reaches outputs 1 and
    2 only, and recomputing outputs 1..2 reads rows 1..6."""
    resample = Resample((4, 4), None, "bilinear", False, None, True)
    rows = resample.matrix(8, 0, torch.float64, torch.device("cpu"))
    assert rows[1].tolist() == pytest.approx([0, 0.125, 0.375, 0.375, 0.125, 0, 0, 0])
    assert rows[0].tolist() == pytest.approx([0.75 / 1.75, 0.75 / 1.75, 0.25 / 1.75, 0, 0, 0, 0, 0])
    axis = ResampleAxis.of(rows)
    assert axis.first.tolist() == [0, 1, 3, 5] and axis.last.tolist() == [2, 4, 6, 7]
    lo = (torch.tensor([3]), torch.tensor([0]))
    arg = Geometry((1, 8), lo, lo, (lo[0] + 1, lo[1] + 8), (8, 8))
    made = resample_geometry((axis, axis), arg, (4, 4))
    assert (int(made.lo[0]), int(made.hi[0])) == (1, 3)
    assert (int(made.start[0]), made.size[0]) == (1, 2)
    assert (int(made.region_start[0]), made.region_len[0]) == (1, 6)
    assert (int(made.lo[1]), int(made.hi[1]), made.size[1]) == (0, 4, 4)  # the whole width changed


def xrv_model() -> nn.Module:
    """A random torchxrayvision DenseNet-121 at NETWORK px whose logits span about +-6 (a raw random
    head gives logits in the hundreds, hiding relative errors of 1e-5 in absolute ones)."""
    pytest.importorskip("torchxrayvision")
    from causal_ie.models import XRVClassifier

    torch.manual_seed(0)
    model = XRVClassifier(weights="random", input_resolution=NETWORK)
    with torch.no_grad():
        head = model.backbone.classifier
        head.weight.mul_(6.0 / float(model(torch.rand(4, 1, NETWORK, NETWORK)).abs().max()))
        head.bias.zero_()
    return model


@pytest.fixture(scope="module")
def xrv():
    return xrv_model()


@pytest.mark.parametrize("shape", [(64, 64), (80, 80), (128, 128), (48, 48), (72, 100)])
def test_xrv_classifier_runs_incrementally_at_any_input_size(xrv, shape):
    """Identity, non-integer and 2x antialiased downscaling, upscaling, a non-square image: windows
    all over the grid, the border ones included, equal the plain forward."""
    clean = torch.rand(2, 1, *shape, generator=torch.Generator().manual_seed(1))
    fwd = IncrementalForward(xrv, clean, verify=0)
    assert fwd.supported, fwd.reason
    window = max(2, shape[0] // 7)
    grid = WindowGrid.create(shape, window, window // 2)
    pick = torch.linspace(0, len(grid) - 1, 24).round().long()
    boxes = window_boxes(grid, pick)
    image_idx = torch.arange(len(pick)) % 2
    x = clean[image_idx].clone()
    for b, (r0, r1, c0, c1) in enumerate(boxes.tolist()):
        x[b, :, r0:r1, c0:c1] = 0.0
    assert not fwd.describe((window, window))["plain"]
    with torch.no_grad():
        ours, plain = fwd(x, image_idx, boxes), xrv(x)
    assert float(plain.abs().max()) > 1.0  # logits of a realistic scale
    assert float((ours - plain).abs().max()) <= TOL


def test_xrv_ce_maps_equal_plain_forwards(xrv):
    clean = torch.rand(1, 1, 90, 90, generator=torch.Generator().manual_seed(2))
    assert incremental_support(xrv, (1, 90, 90)) == (True, "")
    kwargs = dict(window=14, stride=7, spec=InterventionSpec(batch_size=32))
    ours = causal_effect(xrv, clean, **kwargs)
    plain = causal_effect(xrv, clean, window=14, stride=7, spec=InterventionSpec(batch_size=32, incremental=False))
    assert ours.shape == (1, len(xrv.labels), 90, 90)
    assert float(plain.abs().max()) > 1e-3
    assert float((ours - plain).abs().max()) <= TOL


class _ResizingNet(nn.Module):
    """Resizes inside the network: up by a scale factor, down to a fixed size, antialiased."""

    def __init__(self, runtime_size: bool = False):
        super().__init__()
        self.runtime_size = runtime_size
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.mid = nn.Conv2d(6, 6, 3, padding=1)
        self.body = nn.Sequential(*[nn.Conv2d(6, 6, 3, padding=1) for _ in range(4)])
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
        y = torch.relu(self.mid(y))
        size = x.shape[-2:] if self.runtime_size else (21, 27)
        y = F.interpolate(y, size=size, mode="bilinear", antialias=True)
        return self.head(self.body(y).mean(dim=(2, 3)))


def test_interpolate_inside_a_network():
    torch.manual_seed(0)
    model = _ResizingNet().eval()
    clean = torch.rand(2, 1, 24, 32, generator=torch.Generator().manual_seed(3))
    fwd = IncrementalForward(model, clean, cut_fraction=1.0, verify=0)
    assert fwd.supported, fwd.reason
    grid = WindowGrid.create((24, 32), 4, 3)
    boxes = window_boxes(grid, torch.arange(len(grid)))
    image_idx = torch.arange(len(grid)) % 2
    x = clean[image_idx].clone()
    for b, (r0, r1, c0, c1) in enumerate(boxes.tolist()):
        x[b, :, r0:r1, c0:c1] = 1.0
    with torch.no_grad():
        assert float((fwd(x, image_idx, boxes) - model(x)).abs().max()) <= TOL


def test_interpolate_to_a_size_known_only_at_run_time_ends_the_incremental_part():
    """A size read off a map at run time has no rule: the rest of the network runs in full from
    there, the plan says why, and the logits stay exact."""
    torch.manual_seed(0)
    model = _ResizingNet(runtime_size=True).eval()
    clean = torch.rand(1, 1, 24, 32, generator=torch.Generator().manual_seed(3))
    fwd = IncrementalForward(model, clean, cut_fraction=1.0, verify=0)
    cut = fwd.describe((4, 4))["cut"]
    assert "interpolate" in cut and "run time" in cut, cut
    x = clean.clone()
    x[:, :, 5:9, 6:10] = 1.0
    with torch.no_grad():
        assert float((fwd(x, torch.tensor([0]), torch.tensor([[5, 9, 6, 10]])) - model(x)).abs().max()) <= TOL
