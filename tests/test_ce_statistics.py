"""CE-map statistics against values computed by hand or with numpy/scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import entropy as scipy_entropy

from causal_ie.attacks.statistics import STATISTICS, box_share, map_correlation, map_statistics

pytestmark = pytest.mark.usefixtures("one_thread")

DIAG_4x5 = math.sqrt(4**2 + 5**2)


def stats_of(m: list | np.ndarray | torch.Tensor, **kw) -> dict[str, float]:
    return {k: float(v) for k, v in map_statistics(torch.as_tensor(m, dtype=torch.float32), **kw).items()}


def test_keys_dtype_and_order():
    out = map_statistics(torch.rand(2, 3, 4, 5, dtype=torch.float64))
    assert tuple(out) == STATISTICS
    for v in out.values():
        assert v.shape == (2, 3) and v.dtype == torch.float32


def test_single_spike():
    m = torch.zeros(4, 5)
    m[1, 3] = 2.5
    s = stats_of(m)
    assert s == pytest.approx(
        {"max_effect": 2.5, "total_positive": 2.5, "total_negative": 0.0, "entropy": 0.0, "spread": 0.0, "topk_mass": 1.0}
    )


def test_flat_map():
    s = stats_of(torch.full((4, 5), -0.5), top_fraction=0.25)  # k = ceil(0.25 * 20) = 5 pixels
    # rows 0..3: variance (4^2 - 1)/12 = 1.25; cols 0..4: (5^2 - 1)/12 = 2
    assert s == pytest.approx(
        {
            "max_effect": 0.5,
            "total_positive": 0.0,
            "total_negative": 10.0,
            "entropy": 1.0,
            "spread": math.sqrt(1.25 + 2.0) / DIAG_4x5,
            "topk_mass": 5 / 20,
        },
        rel=1e-5,
    )


def test_positive_and_negative_parts():
    s = stats_of([[1.0, -2.0], [0.5, -0.25]])
    assert s["total_positive"] == pytest.approx(1.5)
    assert s["total_negative"] == pytest.approx(2.25)
    assert s["max_effect"] == pytest.approx(2.0)


def test_two_spikes():
    m = torch.zeros(4, 5)
    m[0, 0] = 3.0
    m[3, 4] = -1.0
    # p = (0.75, 0.25); centroid (0.75, 1.0); squared distances 0.75^2+1^2 and 2.25^2+3^2
    msd = 0.75 * (0.75**2 + 1.0**2) + 0.25 * (2.25**2 + 3.0**2)
    assert msd == pytest.approx(4.6875)
    s = stats_of(m)
    assert s["spread"] == pytest.approx(math.sqrt(msd) / DIAG_4x5, rel=1e-6)
    assert s["entropy"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(20), rel=1e-6)
    assert s["topk_mass"] == pytest.approx(0.75)  # k = ceil(0.05 * 20) = 1
    # equal spikes: every pixel is half the centre-to-centre distance 5 = hypot(3, 4) from the centroid
    m[3, 4] = 3.0
    assert stats_of(m)["spread"] == pytest.approx(2.5 / DIAG_4x5, rel=1e-6)


def test_topk_count_is_robust_to_float_noise():
    m = torch.arange(1.0, 101.0).reshape(10, 10)  # 0.07 * 100 = 7.000000000000001 in float
    assert stats_of(m, top_fraction=0.07)["topk_mass"] == pytest.approx(sum(range(94, 101)) / 5050)
    assert stats_of(m, top_fraction=1.0)["topk_mass"] == pytest.approx(1.0)


def test_matches_numpy_reference_on_random_map():
    rng = np.random.default_rng(0)
    m = rng.standard_normal((6, 7))
    a = np.abs(m)
    p = a / a.sum()
    rows, cols = np.indices(m.shape)
    cr, cc = (p * rows).sum(), (p * cols).sum()
    expected = {
        "max_effect": a.max(),
        "total_positive": m[m > 0].sum(),
        "total_negative": -m[m < 0].sum(),
        "entropy": scipy_entropy(p.ravel()) / np.log(42),
        "spread": np.sqrt((p * ((rows - cr) ** 2 + (cols - cc) ** 2)).sum()) / np.hypot(6, 7),
        "topk_mass": np.sort(a.ravel())[-5:].sum() / a.sum(),  # ceil(0.1 * 42) = 5
    }
    assert stats_of(m, top_fraction=0.1) == pytest.approx(expected, rel=1e-5)


def test_leading_dims_equal_per_map_calls():
    maps = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(1))
    batched = map_statistics(maps)
    for n in range(2):
        for k in range(3):
            single = map_statistics(maps[n, k])
            for name in STATISTICS:
                assert single[name].shape == ()
                torch.testing.assert_close(batched[name][n, k], single[name])


def test_all_zero_map_is_finite_zero():
    out = map_statistics(torch.zeros(2, 3, 3))
    for name, v in out.items():
        assert torch.equal(v, torch.zeros(2)), name


def test_single_pixel_map():
    s = stats_of([[-4.0]])
    assert s == pytest.approx(
        {"max_effect": 4.0, "total_positive": 0.0, "total_negative": 4.0, "entropy": 0.0, "spread": 0.0, "topk_mass": 1.0}
    )


@pytest.mark.parametrize(
    ("maps", "kw", "match"),
    [
        (torch.zeros(5), {}, "maps"),
        (torch.zeros(2, 0, 3), {}, "maps"),
        (torch.zeros(3, 3), {"top_fraction": 0.0}, "top_fraction"),
        (torch.zeros(3, 3), {"top_fraction": 1.5}, "top_fraction"),
    ],
)
def test_map_statistics_validation(maps, kw, match):
    with pytest.raises(ValueError, match=match):
        map_statistics(maps, **kw)


# ----------------------------------------------------------------------------- box_share

# |arange(16) - 8| by rows: [8 7 6 5] [4 3 2 1] [0 1 2 3] [4 5 6 7]; total 64
KNOWN = (torch.arange(16.0) - 8).reshape(1, 4, 4)


def test_box_share_known_map():
    maps = KNOWN.repeat(5, 1, 1)
    boxes = torch.tensor(
        [
            [0.0, 0.0, 4.0, 4.0],  # whole image
            [10.0, 10.0, 2.0, 2.0],  # outside the image
            [0.0, 0.0, 2.0, 4.0],  # columns 0, 1: 8+7+4+3+0+1+4+5 = 32
            [0.6, 0.0, 1.0, 4.0],  # only the centre 1.5 is in [0.6, 1.6): column 1 = 7+3+1+5 = 16
            [0.0, 0.0, 4.0, 1.0],  # row 0: 26
        ]
    )
    out = box_share(maps, boxes)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([1.0, 0.0, 0.5, 0.25, 26 / 64]))


def test_box_share_nan_box_and_zero_map():
    maps = torch.cat([KNOWN, torch.zeros(1, 4, 4), KNOWN])
    boxes = torch.tensor([[float("nan")] * 4, [0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 4.0, 4.0]])
    out = box_share(maps, boxes)
    assert torch.isnan(out[0]) and torch.isnan(out[1]) and out[2] == 1.0


def test_box_share_validation():
    with pytest.raises(ValueError, match="boxes"):
        box_share(torch.rand(2, 4, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="maps"):
        box_share(torch.rand(2, 2, 4, 4), torch.zeros(2, 4))


# ----------------------------------------------------------------------------- map_correlation


def test_map_correlation_matches_numpy():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 3, 5, 6, generator=g)
    b = 0.5 * a + torch.randn(2, 3, 5, 6, generator=g)
    out = map_correlation(a, b)
    assert out.shape == (2, 3)
    expected = [[np.corrcoef(a[n, k].ravel(), b[n, k].ravel())[0, 1] for k in range(3)] for n in range(2)]
    np.testing.assert_allclose(out.numpy(), np.array(expected), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(map_correlation(a, -2 * a + 1), torch.full((2, 3), -1.0))


def test_map_correlation_broadcasts_and_constant_is_nan():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(3, 4, 4, generator=g)
    ref = torch.randn(4, 4, generator=g)
    torch.testing.assert_close(map_correlation(a, ref), torch.stack([map_correlation(x, ref) for x in a]))
    const = torch.full((2, 4, 4), 0.1)  # 0.1 is inexact in float: a centred copy is not exactly 0
    out = map_correlation(torch.stack([a[0], a[1]]), const)
    assert torch.isnan(out).all()
    with pytest.raises(ValueError, match="H, W"):
        map_correlation(torch.rand(4, 4), torch.rand(4, 5))
