"""Localisation and faithfulness metrics against values worked out by hand on tiny maps."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchmetrics.utilities.data import dim_zero_sum

from causal_ie.explain.metrics import (
    DEFAULT_THRESHOLDS,
    BoxLocalisation,
    DeletionInsertion,
    EnergyPointingGame,
    PointingGame,
    box_masks,
    localisation_metrics,
)
from causal_ie.interventions import InterventionSpec
from causal_ie.interventions.baselines import blur, blur_kernel_size

THRESHOLDS = DEFAULT_THRESHOLDS


def boxes(*xywh) -> torch.Tensor:
    return torch.tensor(xywh, dtype=torch.float32).reshape(-1, 4)


def peak_map(row: int, col: int, size: int = 6) -> torch.Tensor:
    m = torch.zeros(1, size, size)
    m[0, row, col] = 1.0
    return m


# --- box_masks ---------------------------------------------------------------


def test_box_masks_integer_box_covers_its_columns_and_rows():
    mask = box_masks(boxes((1, 2, 3, 2)), 6, 6)[0]
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[2:4, 1:4] = True
    assert torch.equal(mask, expected)


def test_box_masks_uses_pixel_centres():
    # x=0.6: column 0 (centre 0.5) is out, column 1 (1.5) in; x+w=2.4: column 2 (2.5) out
    mask = box_masks(boxes((0.6, 0.5, 1.8, 1.0)), 4, 4)[0]
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0, 1] = True  # rows: 0.5 <= r + 0.5 < 1.5 -> row 0 only
    assert torch.equal(mask, expected)


def test_box_masks_nan_box_is_empty():
    assert not box_masks(boxes((float("nan"),) * 4), 5, 5).any()


# --- PointingGame --------------------------------------------------------------


def test_pointing_game_hit_and_miss():
    metric = PointingGame()
    maps = torch.cat([peak_map(2, 3), peak_map(2, 3)])
    metric.update(maps, boxes((3, 2, 1, 1), (0, 0, 3, 2)))  # hit (exactly the peak), miss
    assert metric.compute().item() == pytest.approx(0.5)


def test_pointing_game_tolerance_grows_the_box():
    maps = peak_map(2, 4)
    box = boxes((1, 1, 3, 3))  # columns 1..3: the peak is one column to the right
    strict, tolerant = PointingGame(), PointingGame(tolerance=1)
    strict.update(maps, box)
    tolerant.update(maps, box)
    assert strict.compute().item() == 0.0
    assert tolerant.compute().item() == 1.0
    with pytest.raises(ValueError, match="tolerance"):
        PointingGame(tolerance=-1)


def test_pointing_game_ties_score_the_share_of_peaks_inside():
    m = torch.zeros(1, 6, 6)
    m[0, 0, 0] = m[0, 5, 5] = 2.0
    metric = PointingGame()
    metric.update(m, boxes((4, 4, 2, 2)))
    assert metric.compute().item() == 0.5
    # a flat (e.g. empty) map: every pixel is a peak, so it scores like chance
    metric = PointingGame()
    metric.update(torch.zeros(2, 6, 6), boxes((0, 0, 3, 3), (float("nan"),) * 4))
    assert metric.compute().item() == pytest.approx((9 / 36 + 0) / 2)


# --- EnergyPointingGame ---------------------------------------------------------


def test_energy_pointing_game_counts_positive_mass_only():
    m = torch.zeros(3, 6, 6)
    m[0, 1, 1] = 3.0  # inside
    m[0, 4, 4] = 1.0  # outside
    m[0, 5, 5] = -10.0  # negative: ignored
    m[1] = -1.0  # no positive mass -> 0
    # m[2]: all zeros -> 0
    metric = EnergyPointingGame()
    metric.update(m, boxes((0, 0, 3, 3), (0, 0, 3, 3), (0, 0, 3, 3)))
    assert metric.compute().item() == pytest.approx((0.75 + 0 + 0) / 3)


# --- BoxLocalisation ---------------------------------------------------------------


def component_map() -> torch.Tensor:
    """A 6x6 map: a 2x3 block (rows 1-2, cols 1-3) and a smaller lone pixel (5,5)."""
    m = torch.zeros(1, 6, 6)
    m[0, 1:3, 1:4] = 1.0
    m[0, 5, 5] = 0.8
    return m


def test_box_localisation_known_iou_and_iobb():
    # gt: cols 2-4, rows 1-3 (9 px); pred: rows 1-2, cols 1-3 (6 px); overlap 4 px
    metric = BoxLocalisation(THRESHOLDS)
    metric.update(component_map(), boxes((2, 1, 3, 3)))
    out = metric.compute()
    iou, iobb = 4 / 11, 4 / 6
    assert out["iou_mean"].item() == pytest.approx(iou)
    assert out["iobb_mean"].item() == pytest.approx(iobb)
    for t in THRESHOLDS:
        assert out[f"iou@{t:g}"].item() == float(iou > t)
        assert out[f"iobb@{t:g}"].item() == float(iobb > t)
    assert list(out) == [f"iobb@{t:g}" for t in THRESHOLDS] + [f"iou@{t:g}" for t in THRESHOLDS] + [
        "iobb_mean",
        "iou_mean",
    ]
    assert "iou@0.1" in out and "iobb@0.7" in out


def test_box_localisation_uses_8_connectivity():
    m = torch.zeros(1, 6, 6)
    m[0, 0, 0] = m[0, 1, 1] = m[0, 2, 2] = 1.0  # a diagonal: one component of 3
    m[0, 5, 3:5] = 1.0  # a component of 2
    pred = BoxLocalisation().predicted_masks(m)[0]
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[0:3, 0:3] = True
    assert torch.equal(pred, expected)


def test_box_localisation_ratio_equal_to_threshold_is_not_above_it():
    # pred: rows 0-1, cols 0-4 (10 px); gt 3 px inside it -> IoU = IoBB = 3/10 exactly
    m = torch.zeros(2, 6, 6)
    m[0, 0:2, 0:5] = 1.0
    # second pair: pred 2x2 (4 px), gt 2 px inside -> IoU = IoBB = 0.5 exactly
    m[1, 3:5, 3:5] = 1.0
    metric = BoxLocalisation(THRESHOLDS)
    metric.update(m, boxes((0, 0, 3, 1), (3, 3, 2, 1)))
    out = metric.compute()
    assert out["iou@0.2"].item() == 1.0  # both above 0.2
    assert out["iou@0.3"].item() == 0.5  # 0.3 is not > 0.3; 0.5 is
    assert out["iobb@0.3"].item() == 0.5
    assert out["iou@0.4"].item() == 0.5
    assert out["iou@0.5"].item() == 0.0  # 0.5 is not > 0.5
    assert out["iobb@0.5"].item() == 0.0


def test_box_localisation_constant_map_predicts_the_whole_image():
    metric = BoxLocalisation(THRESHOLDS)
    metric.update(torch.zeros(1, 6, 6), boxes((0, 0, 3, 3)))
    out = metric.compute()
    assert out["iou_mean"].item() == pytest.approx(9 / 36)
    assert out["iobb_mean"].item() == pytest.approx(9 / 36)


def test_box_localisation_map_threshold_and_min_max_normalisation():
    m = torch.full((1, 6, 6), 10.0)  # offset and scale must not matter
    m[0, 0:2, 0:2] = 12.0  # normalised 1
    m[0, 2, 0:2] = 10.8  # normalised 0.4: in at map_threshold 0.3, out at 0.5
    gt = boxes((0, 0, 2, 2))
    at_half, at_03 = BoxLocalisation(map_threshold=0.5), BoxLocalisation(map_threshold=0.3)
    at_half.update(m, gt)
    at_03.update(m, gt)
    assert at_half.compute()["iou_mean"].item() == pytest.approx(1.0)
    assert at_03.compute()["iou_mean"].item() == pytest.approx(4 / 6)
    assert at_03.compute()["iobb_mean"].item() == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="map_threshold"):
        BoxLocalisation(map_threshold=1.5)


# --- the collection ------------------------------------------------------------------


def random_pairs(n: int, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    maps = torch.randn(n, size, size, generator=g)
    xy = torch.randint(0, size - 2, (n, 2), generator=g).float()
    wh = torch.randint(1, 4, (n, 2), generator=g).float()
    return maps, torch.cat([xy, wh], dim=1)


def test_localisation_metrics_keys_and_values():
    maps, bxs = random_pairs(5)
    collection = localisation_metrics(THRESHOLDS)
    assert isinstance(collection, nn.Module)
    nn.ModuleDict({"ce": collection})  # it is kept in one by the evaluation
    collection.update(maps, bxs)
    out = collection.compute()
    expected_keys = {"pointing_game", "energy_pointing_game", "iobb_mean", "iou_mean", "pairs"}
    expected_keys |= {f"{k}@{t:g}" for k in ("iou", "iobb") for t in THRESHOLDS}
    assert set(out) == expected_keys
    assert out["pairs"].item() == 5
    pg, box = PointingGame(), BoxLocalisation(THRESHOLDS)
    pg.update(maps, bxs)
    box.update(maps, bxs)
    assert out["pointing_game"] == pg.compute()
    for k, v in box.compute().items():
        assert out[k] == v
    collection.reset()
    collection.update(maps[:2], bxs[:2])
    assert collection.compute()["pairs"].item() == 2


METRIC_FACTORIES = {
    "pointing_game": lambda: PointingGame(tolerance=1),
    "energy_pointing_game": EnergyPointingGame,
    "box": lambda: BoxLocalisation(THRESHOLDS),
    "collection": lambda: localisation_metrics(THRESHOLDS),
}


def flat(result) -> dict[str, float]:
    return {k: float(v) for k, v in result.items()} if isinstance(result, dict) else {"": float(result)}


@pytest.mark.parametrize("name", list(METRIC_FACTORIES))
def test_batched_update_equals_one_pair_at_a_time(name):
    maps, bxs = random_pairs(7)
    batched, single = METRIC_FACTORIES[name](), METRIC_FACTORIES[name]()
    batched.update(maps, bxs)
    for p in range(len(maps)):
        single.update(maps[p : p + 1], bxs[p : p + 1])
    assert flat(batched.compute()) == pytest.approx(flat(single.compute()))


@pytest.mark.parametrize("name", ["pointing_game", "energy_pointing_game", "box"])
def test_merged_shards_equal_one_pass(name):
    """What DDP's sum-sync does: two shards' states merged == one process over all pairs."""
    maps, bxs = random_pairs(9, seed=3)
    one_pass, shard_a, shard_b = (METRIC_FACTORIES[name]() for _ in range(3))
    one_pass.update(maps, bxs)
    shard_a.update(maps[:4], bxs[:4])
    shard_b.update(maps[4:], bxs[4:])
    shard_a.merge_state(shard_b)
    assert flat(shard_a.compute()) == pytest.approx(flat(one_pass.compute()))


def test_every_state_is_summed_across_processes():
    metrics = [PointingGame(), EnergyPointingGame(), BoxLocalisation(), DeletionInsertion(MeanProbability())]
    for metric in metrics:
        assert metric._reductions and all(fx is dim_zero_sum for fx in metric._reductions.values())


def test_reset_forgets_pairs():
    metric = PointingGame()
    metric.update(peak_map(0, 0), boxes((3, 3, 1, 1)))
    metric.reset()
    metric.update(peak_map(0, 0), boxes((0, 0, 1, 1)))
    assert metric.compute().item() == 1.0


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"boxes \[P, 4\] or masks \[P, H, W\]"):
        PointingGame().update(torch.zeros(2, 4, 4), boxes((0, 0, 1, 1)))
    with pytest.raises(ValueError, match=r"maps must be \[P, H, W\]"):
        EnergyPointingGame().update(torch.zeros(4, 4), boxes((0, 0, 1, 1)))


# --- DeletionInsertion ----------------------------------------------------------------


class MeanProbability(nn.Module):
    """A 'classifier' with known outputs: P(finding 0) = mean pixel, P(finding 1) = 1 - mean pixel."""

    def __init__(self):
        super().__init__()
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(len(x))
        mean = x.double().flatten(1).mean(dim=1).clamp(1e-9, 1 - 1e-9)
        return torch.stack([torch.logit(mean), torch.logit(1 - mean)], dim=1)


STAIRS = torch.tensor([[[[0.4, 0.3], [0.2, 0.1]]]])  # [1, 1, 2, 2]


def test_deletion_insertion_by_hand():
    # map = image: the brightest pixel goes first. Means after 0..4 deletions:
    # .25, .15, .075, .025, 0 -> trapezoid (h=.25) = .09375; insertion: 0, .1, .175, .225, .25 -> .15625
    metric = DeletionInsertion(MeanProbability(), n_steps=4, intervention=InterventionSpec(baseline="zero"))
    metric.update(STAIRS, STAIRS[:, 0], torch.tensor([0]))
    out = metric.compute()
    assert out["deletion_auc"].item() == pytest.approx(0.09375, abs=1e-6)
    assert out["insertion_auc"].item() == pytest.approx(0.15625, abs=1e-6)
    # the same pair scored for finding 1 (P = 1 - mean)
    metric = DeletionInsertion(MeanProbability(), n_steps=4, intervention=InterventionSpec(baseline="zero"))
    metric.update(STAIRS, STAIRS[:, 0], torch.tensor([1]))
    out = metric.compute()
    assert out["deletion_auc"].item() == pytest.approx(1 - 0.09375, abs=1e-6)
    assert out["insertion_auc"].item() == pytest.approx(1 - 0.15625, abs=1e-6)


def test_deletion_ties_keep_raster_order():
    image = torch.tensor([[[[0.1, 0.2], [0.3, 0.4]]]])
    metric = DeletionInsertion(MeanProbability(), n_steps=4, intervention=InterventionSpec(baseline="zero"))
    metric.update(image, torch.zeros(1, 2, 2), torch.tensor([0]))
    # deletes 0.1, 0.2, 0.3, 0.4 in turn: means .25, .225, .175, .1, 0 -> .15625
    assert metric.compute()["deletion_auc"].item() == pytest.approx(0.15625, abs=1e-6)


def test_constant_baseline_and_step_rounding():
    metric = DeletionInsertion(MeanProbability(), n_steps=4, intervention=InterventionSpec(baseline=0.5))
    metric.update(torch.zeros(1, 1, 2, 2), torch.rand(1, 2, 2), torch.tensor([0]))
    out = metric.compute()  # linear 0 -> .5 and back: area .25 either way
    assert out["deletion_auc"].item() == pytest.approx(0.25, abs=1e-6)
    assert out["insertion_auc"].item() == pytest.approx(0.25, abs=1e-6)
    assert DeletionInsertion(MeanProbability(), n_steps=3).pixel_counts(4) == [0, 1, 3, 4]
    fractions, _, _ = DeletionInsertion(MeanProbability(), n_steps=3, intervention=InterventionSpec(baseline="zero")).curves(
        torch.rand(1, 1, 2, 2), torch.rand(1, 2, 2), torch.tensor([0])
    )
    assert fractions.tolist() == [0, 0.25, 0.75, 1]


def test_blur_baseline_keeps_a_constant_image():
    assert blur_kernel_size(32) == 9 and blur_kernel_size(6) == 3
    image = torch.full((2, 1, 8, 8), 0.7)
    torch.testing.assert_close(blur(image), image)
    metric = DeletionInsertion(MeanProbability(), n_steps=4, intervention=InterventionSpec(baseline="blur"))
    metric.update(image, torch.rand(2, 8, 8), torch.tensor([0, 0]))
    out = metric.compute()
    assert out["deletion_auc"].item() == pytest.approx(0.7, abs=1e-5)
    assert out["insertion_auc"].item() == pytest.approx(0.7, abs=1e-5)


def test_batches_are_bounded_and_batched_update_equals_single():
    model = MeanProbability()
    images = torch.rand(3, 1, 6, 6)
    maps = torch.rand(3, 6, 6)
    findings = torch.tensor([0, 1, 0])
    batched = DeletionInsertion(model, n_steps=4, intervention=InterventionSpec(baseline="blur", batch_size=4))
    batched.update(images, maps, findings)
    assert max(model.batch_sizes) <= 4
    assert sum(model.batch_sizes) == 3 + 2 * 3 * 5  # the 3 images, then deletion + insertion, 5 steps each
    single = DeletionInsertion(MeanProbability(), n_steps=4, intervention=InterventionSpec(baseline="blur", batch_size=128))
    for p in range(3):
        single.update(images[p : p + 1], maps[p : p + 1], findings[p : p + 1])
    assert flat(batched.compute()) == pytest.approx(flat(single.compute()))
    shard = DeletionInsertion(MeanProbability(), n_steps=4, intervention=InterventionSpec(baseline="blur"))
    shard.update(images[:1], maps[:1], findings[:1])
    rest = DeletionInsertion(MeanProbability(), n_steps=4, intervention=InterventionSpec(baseline="blur"))
    rest.update(images[1:], maps[1:], findings[1:])
    shard.merge_state(rest)
    assert flat(shard.compute()) == pytest.approx(flat(single.compute()))
    single.reset()
    single.update(images[:1], maps[:1], findings[:1])
    rest.reset()
    rest.update(images[:1], maps[:1], findings[:1])
    assert flat(single.compute()) == pytest.approx(flat(rest.compute()))


def test_classifier_is_not_a_submodule():
    classifier = nn.Linear(4, 2)
    metric = DeletionInsertion(classifier)
    assert metric.classifier is classifier
    assert list(metric.children()) == []
    assert set(metric.state_dict()) <= {"deletion_sum", "insertion_sum", "total"}
    holder = nn.ModuleDict({"ce": metric})
    assert not any(p is classifier.weight for p in holder.parameters())


def test_faithful_map_beats_reversed_map():
    image = torch.rand(1, 1, 8, 8)
    good, bad = (DeletionInsertion(MeanProbability(), n_steps=8, intervention=InterventionSpec(baseline="zero")) for _ in range(2))
    good.update(image, image[:, 0], torch.tensor([0]))
    bad.update(image, -image[:, 0], torch.tensor([0]))
    assert good.compute()["deletion_auc"] < bad.compute()["deletion_auc"]
    assert good.compute()["insertion_auc"] > bad.compute()["insertion_auc"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="baseline"):
        DeletionInsertion(MeanProbability(), intervention=InterventionSpec(baseline="mean-ish"))
    with pytest.raises(ValueError, match="outcome='prob'"):
        DeletionInsertion(MeanProbability(), intervention=InterventionSpec(outcome="logit"))
    with pytest.raises(ValueError, match="n_steps"):
        DeletionInsertion(MeanProbability(), n_steps=0)
    with pytest.raises(ValueError, match="maps must be"):
        metric = DeletionInsertion(MeanProbability())
        metric.update(torch.rand(1, 1, 4, 4), torch.rand(1, 3, 3), torch.tensor([0]))
