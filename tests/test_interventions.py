"""The CE engine: equality with Captum Occlusion, exact zeros, baselines, outcomes, batching, errors."""

from __future__ import annotations

import pytest
import torch
from captum.attr import Occlusion
from torch import nn

from causal_ie.interventions import (
    WindowGrid,
    blur,
    causal_effect,
    mask_effect,
    slic_segments,
    superpixel_effect,
    window_offsets,
)

K = 14


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_conv(channels: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A small random CNN with 14 outputs whose logits react to every pixel."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(channels, 6, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(3),
        nn.Flatten(),
        nn.Linear(72, K),
    )
    with torch.no_grad():
        model[-1].weight.mul_(4.0)  # spread the probabilities away from 0.5
    return model.to(dtype).eval()


class BoxModel(nn.Module):
    """Logits are a linear function of the pixels inside rows r0:r1, cols c0:c1 only.

    Written as a per-row multiply-and-sum rather than a matmul, so its numbers do not
    depend on how many images share a forward (BLAS picks kernels by batch size):
    a nonzero effect outside the box can then only come from the engine.
    """

    def __init__(self, box: tuple[int, int, int, int], channels: int = 1):
        super().__init__()
        r0, r1, c0, c1 = box
        self.box = box
        torch.manual_seed(1)
        self.weight = nn.Parameter(torch.randn(K, channels * (r1 - r0) * (c1 - c0)))

    def forward(self, x):
        r0, r1, c0, c1 = self.box
        return (x[..., r0:r1, c0:c1].flatten(1)[:, None, :] * self.weight).sum(dim=-1)


def captum_maps(model, x, window, stride, baseline, transform=torch.sigmoid):
    """Captum Occlusion once per finding, as the reference: [N, K, H, W]."""
    c = x.shape[1]
    wh, ww = (window, window) if isinstance(window, int) else window
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    maps = []
    for k in range(K):
        occlusion = Occlusion(lambda z, k=k: transform(model(z))[:, k])
        attr = occlusion.attribute(
            x, sliding_window_shapes=(c, wh, ww), strides=(c, sh, sw), baselines=baseline, target=None
        )
        maps.append(attr.mean(dim=1))  # identical over channels: the window covers all of them
    return torch.stack(maps, dim=1)


CAPTUM_CASES = [
    # (image size, channels, window, stride, baseline, outcome)
    (16, 1, 4, 2, "zero", "prob"),
    (16, 3, 5, 3, "constant", "logit"),  # (16 - 5) / 3 is not whole: clipped last window
    (15, 1, (4, 6), (3, 4), "blur", "prob"),
    (13, 3, 3, 3, "mean", "logit"),
    (12, 1, 3, 2, "constant", "softmax"),
    (8, 3, 1, 1, "zero", "prob"),
]


@pytest.mark.parametrize("size,channels,window,stride,baseline,outcome", CAPTUM_CASES)
def test_equals_captum_occlusion(size, channels, window, stride, baseline, outcome):
    model = tiny_conv(channels)
    x = torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(size))
    reference_baseline = {
        "zero": 0.0,
        "constant": 0.7,
        "blur": blur(x),
        "mean": x.mean(dim=(2, 3), keepdim=True).expand_as(x).contiguous(),
    }[baseline]
    transform = {"prob": torch.sigmoid, "logit": lambda z: z, "softmax": lambda z: z.softmax(-1)}[outcome]
    ours = causal_effect(
        model, x, window=window, stride=stride, baseline=baseline, baseline_value=0.7, outcome=outcome, batch_size=16
    )
    reference = captum_maps(model, x, window, stride, reference_baseline, transform)
    assert ours.shape == (2, K, size, size)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    assert ours.abs().amax() > 1e-3  # not trivially zero


def test_tensor_baseline_equals_captum():
    model = tiny_conv(1)
    x = torch.rand(1, 1, 12, 12)
    b = torch.rand(1, 1, 12, 12)
    ours = causal_effect(model, x, window=3, stride=2, baseline=b)
    torch.testing.assert_close(ours, captum_maps(model, x, 3, 2, b), atol=1e-5, rtol=0)


def test_window_placement_matches_captum_and_clips_at_the_border():
    assert window_offsets(16, 4, 2) == [0, 2, 4, 6, 8, 10, 12]
    assert window_offsets(11, 4, 3) == [0, 3, 6, 9]  # the last window covers rows 9 and 10 only
    assert window_offsets(10, 2, 5) == [0, 5]  # stride > window: gaps, nothing starts outside
    grid = WindowGrid.create((11, 11), 4, 3)
    assert grid.shape == (4, 4)
    assert grid.pixel_index(torch.tensor([15])).unique().tolist() == [9 * 11 + 9, 9 * 11 + 10, 10 * 11 + 9, 120]


def test_border_pixels_are_covered_by_clipped_windows():
    """Only pixel (10, 10) matters: it lies in the clipped last window alone, so its CE is the full drop."""
    model = BoxModel((10, 11, 10, 11))
    x = torch.ones(1, 1, 11, 11)
    maps = causal_effect(model, x, window=4, stride=3, outcome="logit")
    drop = model(x)[0]
    torch.testing.assert_close(maps[0, :, 10, 10], drop)
    torch.testing.assert_close(maps[0, :, 9, 9], drop / 4)  # 4 windows cover (9, 9), one of them matters


def test_gaps_of_a_stride_larger_than_the_window_are_zero():
    model = tiny_conv(1)
    maps = causal_effect(model, torch.rand(1, 1, 10, 10), window=2, stride=5)
    covered = torch.zeros(10, 10, dtype=torch.bool)
    for r in (0, 5):
        for c in (0, 5):
            covered[r : r + 2, c : c + 2] = True
    assert (maps[0, :, ~covered] == 0).all()
    assert (maps[0, :, covered] != 0).any()


def test_effect_is_exactly_zero_away_from_the_box():
    box = (5, 9, 6, 11)  # rows 5..8, cols 6..10 of a 16 x 16 image
    model = BoxModel(box)
    x = torch.rand(2, 1, 16, 16)
    maps = causal_effect(model, x, window=3, stride=1, baseline="constant", baseline_value=0.5, outcome="logit")
    # pixels whose every covering window misses the box (window 3: more than 2 px away)
    near = torch.zeros(16, 16, dtype=torch.bool)
    near[box[0] - 2 : box[1] + 2, box[2] - 2 : box[3] + 2] = True
    assert (maps[:, :, ~near] == 0).all()
    assert (maps[:, :, box[0] : box[1], box[2] : box[3]].abs() > 0).all()


def test_noise_baseline_is_the_mean_of_single_sample_runs():
    model = tiny_conv(1)
    x = torch.rand(2, 1, 12, 12)
    samples = 3

    def noise_run():
        return causal_effect(model, x, window=4, stride=2, baseline="noise", noise_samples=samples, seed=7)

    maps = noise_run()
    noise = torch.rand((samples, *x.shape), generator=torch.Generator().manual_seed(7))
    explicit = torch.stack([causal_effect(model, x, window=4, stride=2, baseline=noise[s]) for s in range(samples)])
    torch.testing.assert_close(maps, explicit.mean(0), atol=1e-6, rtol=0)
    again = noise_run()
    assert torch.equal(maps, again)


def test_ece_outcome_is_the_hand_formula():
    model = tiny_conv(1, dtype=torch.float64)
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64)
    maps = causal_effect(model, x, window=4, stride=4, outcome="ece")  # 4 disjoint windows
    assert maps.shape == (1, 1, 8, 8)
    p = model(x).softmax(-1)[0]
    for r in (0, 4):
        for c in (0, 4):
            xp = x.clone()
            xp[..., r : r + 4, c : c + 4] = 0
            q = model(xp).softmax(-1)[0]
            expected = (p * (q - p)).sum()
            torch.testing.assert_close(maps[0, 0, r : r + 4, c : c + 4], expected.expand(4, 4))


def test_batch_size_and_image_mixing_do_not_change_maps():
    model = tiny_conv(3)
    x = torch.rand(3, 3, 12, 12)
    runs = [causal_effect(model, x, window=4, stride=3, batch_size=b) for b in (1, 7, None)]
    for other in runs[1:]:
        torch.testing.assert_close(other, runs[0], atol=1e-6, rtol=0)
    alone = torch.cat([causal_effect(model, x[i : i + 1], window=4, stride=3, batch_size=5) for i in range(3)])
    torch.testing.assert_close(runs[1], alone, atol=1e-6, rtol=0)


def test_generic_masks_equal_the_window_fast_path():
    model = tiny_conv(1)
    x = torch.rand(2, 1, 11, 11)
    grid = WindowGrid.create((11, 11), 4, 3)
    masks = torch.zeros(1, len(grid), 11 * 11, dtype=torch.bool)
    masks[0].scatter_(1, grid.pixel_index(torch.arange(len(grid))), True)
    masks = masks.view(1, len(grid), 11, 11)
    for baseline in ("zero", "blur"):
        fast = causal_effect(model, x, window=4, stride=3, baseline=baseline)
        generic = mask_effect(model, x, masks, baseline=baseline, batch_size=5)
        torch.testing.assert_close(generic, fast, atol=1e-6, rtol=0)
    assert mask_effect(model, x, masks, as_maps=False).shape == (2, K, len(grid))


def test_model_mode_is_restored_and_no_grad_is_kept():
    model = tiny_conv(1).train()
    maps = causal_effect(model, torch.rand(1, 1, 8, 8), window=4, stride=4)
    assert model.training and all(m.training for m in model.modules())
    assert not maps.requires_grad


def test_works_under_inference_mode():
    model = tiny_conv(1)
    x = torch.rand(1, 1, 8, 8)
    expected = causal_effect(model, x, window=4, stride=2)
    with torch.inference_mode():
        torch.testing.assert_close(causal_effect(model, x, window=4, stride=2), expected)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(window=20, stride=2), "window"),
        (dict(window=0, stride=2), "window"),
        (dict(window=4, stride=0), "stride"),
        (dict(window=4, stride=2, baseline="gaussian"), "baseline"),
        (dict(window=4, stride=2, outcome="odds"), "outcome"),
        (dict(window=4, stride=2, baseline=torch.zeros(3, 3)), "baseline"),
        (dict(window=4, stride=2, batch_size=0), "batch_size"),
    ],
)
def test_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        causal_effect(tiny_conv(1), torch.rand(1, 1, 16, 16), **kwargs)


@pytest.mark.parametrize(
    "x,match",
    [
        (torch.rand(1, 16, 16), "4-D"),
        (torch.randint(0, 2, (1, 1, 16, 16)), "float"),
        (torch.rand(1, 1, 16, 16) * 3 - 1, r"\[0, 1\]"),
    ],
)
def test_images_must_be_4d_floats_in_unit_range(x, match):
    with pytest.raises(ValueError, match=match):
        causal_effect(tiny_conv(1), x, window=4, stride=2)


# ---------------------------------------------------------------- superpixels


def test_superpixel_maps_are_constant_per_segment_and_equal_a_brute_force_loop():
    model = tiny_conv(1, dtype=torch.float64)
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    maps, segments = superpixel_effect(model, x, n_segments=8, compactness=0.1, batch_size=5)
    assert maps.shape == (2, K, 16, 16) and segments.shape == (2, 16, 16) and segments.dtype == torch.long
    for n in range(2):
        p = model(x[n : n + 1]).sigmoid()[0]
        labels = segments[n].unique()
        assert labels.tolist() == list(range(len(labels)))
        for label in labels:
            inside = segments[n] == label
            values = maps[n][:, inside]
            assert (values == values[:, :1]).all()  # piecewise constant
            xp = x[n : n + 1].clone()
            xp[0, :, inside] = 0.0
            torch.testing.assert_close(values[:, 0], p - model(xp).sigmoid()[0])


def test_superpixels_of_colour_images_and_given_segments():
    model = tiny_conv(3)
    x = torch.rand(1, 3, 16, 16)
    segments = slic_segments(x, n_segments=6)
    assert segments.shape == (1, 16, 16) and segments.min() == 0
    maps, same = superpixel_effect(model, x, segments=segments, baseline="blur")
    assert torch.equal(same, segments) and maps.shape == (1, K, 16, 16)
    halves = torch.zeros(1, 16, 16, dtype=torch.long)
    halves[:, :, 8:] = 1
    maps, _ = superpixel_effect(model, x, segments=halves, outcome="logit")
    windows = causal_effect(model, x, window=(16, 8), stride=(16, 8), outcome="logit")
    torch.testing.assert_close(maps, windows, atol=1e-6, rtol=0)


def test_progress_bar_only_when_asked(capsys):
    model = tiny_conv(1)
    x = torch.rand(1, 1, 8, 8)
    causal_effect(model, x, window=4, stride=4)
    assert "interventions" not in capsys.readouterr().err
    causal_effect(model, x, window=4, stride=4, progress=True)
    assert "interventions" in capsys.readouterr().err


def test_differentiable_effects_have_the_gradients_of_the_interventions():
    """With ``differentiable=True`` the map is a function of the image that autograd can follow
    (an attacker who knows a CE detector needs it): gradcheck against finite differences."""
    model = tiny_conv(1).double()
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64, requires_grad=True)

    def ce(images):
        return causal_effect(model, images, window=4, stride=4, baseline="blur", outcome="logit", differentiable=True)

    assert torch.autograd.gradcheck(ce, (x,), eps=1e-6, atol=1e-5)
    assert not causal_effect(model, x, window=4, stride=4).requires_grad  # the default keeps no graph


# ---------------------------------------------------------------- engine settings (issue #15 part 2)


def test_engine_defaults_equal_the_nchw_no_grad_engine_and_leave_the_model_as_it_was():
    """channels_last weights and inference mode (the defaults) change nothing but speed: maps within
    1e-5 of NCHW forwards under no_grad, and every weight is the same tensor, bit for bit, in its
    own layout afterwards."""
    from causal_ie.interventions import EngineSettings
    from causal_ie.models import Classifier

    torch.manual_seed(0)
    model = Classifier(backbone="test_resnet", image_size=32).eval()
    weights = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    old = EngineSettings(channels_last=False, inference_mode=False)
    for incremental in (True, False):
        ours = causal_effect(model, x, window=5, stride=3, incremental=incremental)
        reference = causal_effect(model, x, window=5, stride=3, incremental=incremental, engine=old)
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
        assert not ours.is_inference()
        ours.add_(1.0)  # an ordinary tensor: in-place changes are fine outside inference mode
    for name, p in model.named_parameters():
        assert p is weights[name][0] and torch.equal(p, weights[name][1])
        assert p.is_contiguous()


def test_channels_last_weights_are_restored_after_an_error():
    from causal_ie.interventions.fast import channels_last_weights

    model = tiny_conv(3)
    before = model[0].weight.data_ptr()
    with pytest.raises(RuntimeError, match="boom"):
        with channels_last_weights(model):
            assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
            assert model[0].weight.data_ptr() != before
            raise RuntimeError("boom")
    assert model[0].weight.data_ptr() == before and model[0].weight.is_contiguous()


def test_engine_settings_are_checked_and_carried_whole():
    from causal_ie.interventions import EngineSettings, InterventionSpec

    spec = InterventionSpec(engine={"compile": True})
    assert spec.engine == EngineSettings(compile=True)
    assert InterventionSpec().engine == EngineSettings() and InterventionSpec(engine=None).engine.channels_last
    assert InterventionSpec.resolve(spec, batch_size=8).engine is spec.engine
    with pytest.raises(ValueError, match="compile_mode"):
        EngineSettings(compile_mode="fastest")
    with pytest.raises(ValueError, match="engine.compile"):
        EngineSettings(compile="yes")
    with pytest.raises(TypeError, match="unknown engine setting"):
        InterventionSpec(engine={"turbo": True})


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch, caplog):
    """A compiler that fails: one warning, then the eager forward; the maps are unchanged."""
    import logging

    from causal_ie.interventions import EngineSettings, fast

    def broken(module, **kwargs):
        def run(*args):
            raise RuntimeError("no compiler here")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    model = tiny_conv(1)
    x = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    expected = causal_effect(model, x, window=3, stride=2)
    with caplog.at_level(logging.WARNING, logger="causal_ie.interventions.fast"):
        maps = causal_effect(model, x, window=3, stride=2, engine=EngineSettings(compile=True), batch_size=16)
    torch.testing.assert_close(maps, expected, atol=1e-6, rtol=0)
    assert any("no compiler here" in r.getMessage() for r in caplog.records)
    fast._CACHE.clear()


def test_padded_compiled_calls_cut_batches_back():
    """Batches are padded to the compiled batch size (one shape) and cut back; larger ones run in chunks."""
    from causal_ie.interventions import EngineSettings, fast

    calls = []
    model = tiny_conv(1)

    def fake_compile(module, **kwargs):
        def run(x):
            calls.append(x.shape[0])
            return module(x)

        return run

    original = torch.compile
    torch.compile = fake_compile
    try:
        run = fast.compiled(model, EngineSettings(compile=True), batch=8, key="test-padding")
        x = torch.rand(19, 1, 8, 8)
        with torch.no_grad():
            out = run(x)
            torch.testing.assert_close(out, model(x), atol=1e-6, rtol=0)
    finally:
        torch.compile = original
        fast._CACHE.clear()
    assert calls == [8, 8, 8]


@pytest.mark.slow
def test_compiled_engine_equals_eager():
    """engine.compile=true with inductor (and freezing): the model (incremental off) and the network
    after the incremental cut compiled; maps within 1e-5 of eager, compiled once per shape."""
    from causal_ie.interventions import EngineSettings, fast
    from causal_ie.models import Classifier

    torch.manual_seed(0)
    model = Classifier(backbone="test_resnet", image_size=32).eval()
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = causal_effect(model, x, window=5, stride=3, incremental=False,
                              engine=EngineSettings(channels_last=False, inference_mode=False))
    engine = EngineSettings(compile=True)
    records = len(fast.RECORDS)
    for incremental in (True, False):
        for _ in range(2):
            maps = causal_effect(model, x, window=5, stride=3, incremental=incremental, engine=engine, batch_size=32)
            torch.testing.assert_close(maps, reference, atol=1e-5, rtol=0)
    new = fast.RECORDS[records:]
    assert {r.what for r in new} == {"Classifier", "Classifier after the incremental cut"}
    assert all(not r.failed and r.compilations == 1 for r in new)
    fast._CACHE.clear()
