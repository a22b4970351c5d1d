"""Detectors as plug-ins: a detector of one's own, added by config alone, is scored like the built-ins."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import eval_cfg
from hydra.errors import InstantiationException
from sklearn.metrics import roc_auc_score

from causal_ie.attacks.detection import crossfit_scores
from causal_ie.attacks.detectors import Detector
from causal_ie.evaluation import evaluate
from causal_ie.outputs.results import read_results
from causal_ie.outputs.schema import EVALUATION, problems

ATTACK = ["cams=[]", "evaluation.faithfulness=false", "detection.test_images=16", "detection.n_boot=200",
          "detection.reference_images=32", "detection.detectors.ce.latent_layer=null", "detection.pairs=all",
          "latent=null", "attack=fgsm", "attack.eps=0.03"]


class BrightnessDetector(Detector):
    """A user's detector: the mean and spread of the pixels, times ``scale``. It remembers what it
    returned, call by call (the study calls it on the clean, then the adversarial images of a batch)."""

    def __init__(self, scale: float = 1.0, estimator: str = "logistic"):
        super().__init__(estimator)
        self.scale = float(scale)
        self.calls: list[tuple[list[int], np.ndarray]] = []

    def features(self, classifier, images, probs, index, differentiable=False):
        values = {"mean": self.scale * images.mean((1, 2, 3)), "spread": self.scale * images.std((1, 2, 3))}
        self.calls.append((index.tolist(), torch.stack(list(values.values()), 1).double().cpu().numpy()))
        return values


def test_a_detector_defined_here_is_cross_fitted_scored_and_reported(tmp_path, checkpoint):
    own = "+detection.detectors.brightness={_target_:test_detector_plugins.BrightnessDetector,scale:2.0}"
    cfg = eval_cfg(tmp_path, checkpoint, *ATTACK, own,
                   # a copy of a built-in with the same settings, one with others, and lid (no default reaches it)
                   "+detector@detection.detectors.max_prob_copy=max_prob",
                   "+detector@detection.detectors.noise_flip_strong=noise_flip",
                   "detection.detectors.noise_flip_strong.std=0.1",
                   "+detector@detection.detectors.lid=lid", "detection.detectors.lid.k=5",
                   "+detector@detection.detectors.ce_random=ce_random", "detection.detectors.ce_random.grids=[4]")
    results, objects = evaluate(cfg)
    assert problems(results, EVALUATION) == []
    det = read_results(tmp_path / "results.json")["detection"]
    mine = det["brightness"]
    assert mine["n_test"] == 16 and mine["features"] == 2 and mine["estimator"] == "logistic"
    assert mine["target"] == "test_detector_plugins.BrightnessDetector"
    assert mine["auroc_ci_low"] <= mine["auroc"] <= mine["auroc_ci_high"]
    assert "tpr@5fpr_ci_low" in mine
    # what was scored is exactly what the detector returned: cross-fit its own features by hand
    detector = objects["module"].attack.detection.detectors["brightness"]
    clean = {i: f for index, f in detector.calls[0::2] for i, f in zip(index, f)}
    adv = {i: f for index, f in detector.calls[1::2] for i, f in zip(index, f)}
    records = objects["module"].artefacts["attack"]["records"]
    order = records.index.tolist()
    assert sorted(order) == list(range(16)) and sorted(clean) == sorted(adv) == order
    c, a, _ = crossfit_scores(np.stack([clean[i] for i in order]), np.stack([adv[i] for i in order]),
                              list(records.groups), seed=cfg.seed, repeats=2)
    assert mine["auroc"] == pytest.approx(roc_auc_score(np.r_[np.zeros(16), np.ones(16)], np.r_[c, a]), abs=1e-12)
    # the image an index names is the image the detector saw
    test = objects["datamodule"].dataset("test")
    first_index, first_values = detector.calls[0][0][0], detector.calls[0][1][0]
    assert first_values[0] == pytest.approx(2.0 * float(test[first_index]["image"].mean()), rel=1e-6)
    # a copy with the same settings scores exactly as the original; one with other settings beside it
    for key in ("auroc", "auroc_ci_low", "auroc_ci_high", "tpr@5fpr"):
        assert det["max_prob_copy"][key] == det["max_prob"][key], key
    assert det["noise_flip_strong"]["n_test"] == det["noise_flip"]["n_test"] == 16
    assert det["noise_flip_strong"]["auroc"] != det["noise_flip"]["auroc"]
    assert math.isfinite(det["lid"]["auroc"]) and det["lid"]["target"].endswith("LIDDetector")
    assert math.isfinite(det["ce_random"]["auroc"]) and "brightness" in det["ce_random"]["auroc_minus"]
    # combined holds every other detector's features; the detectors that read CE are compared with it
    others = [n for n in ("ce", "max_prob", "noise_flip", "feature_squeezing", "mahalanobis", "brightness",
                          "max_prob_copy", "noise_flip_strong", "lid", "ce_random")]
    assert det["combined"]["features"] == sum(det[n]["features"] for n in others)
    assert "brightness" in det["ce"]["auroc_minus"] and "brightness" in det["combined"]["auroc_minus"]
    assert "auroc_minus" not in mine
    report = (tmp_path / "report.md").read_text()
    assert "| brightness |" in report and "| noise_flip_strong |" in report and "| lid |" in report


def test_the_detector_set_is_the_configs_choice(tmp_path, checkpoint):
    cfg = eval_cfg(tmp_path, checkpoint, *ATTACK, "~detection.detectors.mahalanobis",
                   "~detection.detectors.feature_squeezing", "detection.detectors.combined.of=[ce,max_prob]")
    results, _ = evaluate(cfg)
    det = results["detection"]
    assert "mahalanobis" not in det and "feature_squeezing" not in det
    assert det["combined"]["features"] == det["ce"]["features"] + det["max_prob"]["features"]


def test_a_study_without_the_ce_detector_runs_and_saves_no_ce_features(tmp_path, checkpoint):
    cfg = eval_cfg(tmp_path, checkpoint, *ATTACK, "~detection.detectors.ce", "~detection.detectors.mahalanobis")
    results, _ = evaluate(cfg)
    det = results["detection"]
    assert "ce" not in det and det["combined"]["features"] == 3  # max_prob, noise_flip, feature_squeezing
    assert "auroc_minus" not in det["combined"]  # nothing it combines reads CE
    assert problems(results, EVALUATION) == [] and not (tmp_path / "detection.npz").exists()
    assert "| max_prob |" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    ("override", "error", "message"),
    [
        ("+detection.detectors.bad={_target_:builtins.dict}", TypeError,
         r"detection.detectors.bad is a dict: expected a detector"),
        ("detection.detectors.combined.of=[ce,nothing]", ValueError, r"combined.of names \['nothing'\]"),
        ("detection.detectors.noise_flip.std=-1", InstantiationException, r"noise_flip.std must be"),
        ("+detection.detectors.brightness={_target_:test_detector_plugins.BrightnessDetector} "
         "detection.adaptive.against=brightness", ValueError,
         r"against='brightness': BrightnessDetector gives the attacker no gradient"),
        ("detection.detectors.ce.estimator=gbm detection.adaptive.against=ce", ValueError,
         r"against='ce': its estimator is 'gbm'"),
        ("detection.adaptive.against=mine", ValueError, r"against='mine': expected all or one of the selected detectors"),
    ],
)
def test_bad_detectors_fail_before_the_test_loop(tmp_path, checkpoint, override, error, message):
    cfg = eval_cfg(tmp_path, checkpoint, *ATTACK, "attack.adaptive=true", *override.split(" "))
    with pytest.raises(error, match=message):
        evaluate(cfg)
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize(
    ("overrides", "windows", "grids"),
    [
        (["mask.size=8", "mask.stride=4"], ((8, 4),), ()),
        (["mask.size=16", "mask.stride=16"], ((16, 16),), ()),
        (["mask=superpixel"], (), (4, 8)),  # no window size: the coarse tilings
        (["detection.detectors.ce.window=null", "detection.detectors.ce.grids=[2]"], (), (2,)),
    ],
)
def test_the_ce_detector_reads_the_masks_windows_so_a_mask_sweep_changes_detection(tmp_path, overrides, windows, grids):
    from hydra.utils import instantiate

    from conftest import compose_config

    cfg = compose_config("evaluate", ["attack=fgsm", *overrides], tmp_path)
    detector = instantiate(cfg.detection.detectors.ce)
    assert detector.extractor.windows == windows and detector.extractor.grids == grids
    names = detector.extractor.placements((64, 64))
    assert list(names) == [*(f"g{g}" for g in grids), *(f"w{w}s{s}" for w, s in windows)]
