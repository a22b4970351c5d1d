"""evaluate.py with attack!=none: attack results, CE under attack, detection, figures, sweeps."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_EVAL, eval_cfg
from hydra.utils import instantiate
from sklearn.metrics import roc_auc_score

from causal_ie.attacks.detection import crossfit_scores, detect, load_detection_data
from causal_ie.rows import group_code
from causal_ie.evaluation import evaluate
from causal_ie.outputs.results import flatten, read_results
from causal_ie.outputs.schema import EVALUATION, problems

# no CAMs or deletion curves: the attack study is what is tested here
# the tiny checkpoint is barely trained, so few attacks succeed: score every pair
ATTACK_EVAL = ["cams=[]", "evaluation.faithfulness=false", "detection.test_images=16", "detection.n_boot=200",
               "detection.reference_images=32", "detection.detectors.ce.latent_layer=null", "detection.pairs=all"]


def test_attacked_evaluation_writes_attack_and_detection_results(tmp_path, checkpoint):
    cfg = eval_cfg(tmp_path, checkpoint, *ATTACK_EVAL, "attack=pgd", "attack.eps=0.03", "attack.steps=3")
    results, objects = evaluate(cfg)
    saved = flatten(json.loads((tmp_path / "results.json").read_text()))
    assert problems(results, EVALUATION) == []  # every key is described in the schema
    for key in ("attack.success_rate", "detection.ce.auroc", "detection.ce.tpr@5fpr",
                "detection.max_prob.auroc", "detection.noise_flip.auroc"):
        assert key in saved, key
    attack = results["attack"]
    assert attack["num_images"] == 16 and attack["perturbation"]["linf"] <= 0.03 + 1e-6
    assert attack["perturbation"]["linf"] > 0
    assert set(attack["auroc"]) == set(objects["datamodule"].findings)
    for method in ("ce", "ce_latent"):
        stats = results["ce_under_attack"][method]
        assert {"max_effect", "entropy", "spread", "topk_mass", "box_share", "correlation_with_clean"} <= set(stats)
        assert -1 <= stats["correlation_with_clean"]["adv_mean"] <= 1
    # every pair is scored out of sample; each cross-fit half trains on about half of them
    det = results["detection"]["ce"]
    assert det["n_test"] == 16 and 0 < det["n_train"] <= 8
    assert det["auroc_ci_low"] <= det["auroc"] <= det["auroc_ci_high"]
    assert results["detection"]["repeats"] == 2
    for name in ("max_prob", "noise_flip", "feature_squeezing", "mahalanobis", "combined"):
        assert results["detection"][name]["n_test"] == 16, name
    minus = det["auroc_minus"]["noise_flip"]
    assert minus == pytest.approx(det["auroc"] - results["detection"]["noise_flip"]["auroc"])
    report = (tmp_path / "report.md").read_text()
    for png in ("adversarial_maps.png", "adversarial_statistics.png", "detection_roc.png"):
        assert (tmp_path / "figures" / png).is_file() and f"figures/{png}" in report
    assert "## Adversarial attack: pgd" in report and "| noise_flip |" in report
    data = load_detection_data(tmp_path / "detection.npz")
    assert data.features_clean.shape == data.features_adv.shape == (16, results["detection"]["ce"]["features"])
    # the module went back to eval mode after attacking (BatchNorm must not train on test data)
    assert not any(m.training for m in objects["module"].classifier.modules())


def test_attack_outcome_and_baseline_detector_equal_a_recomputation_by_hand(tmp_path, checkpoint):
    """FGSM is deterministic: redo it here (sign of the gradient of the top finding's BCE), then
    the success rate, the flip rate and the max_prob detector's AUROC on the same patient splits."""
    eps, repeats = 0.03, 2
    cfg = eval_cfg(tmp_path, checkpoint, *ATTACK_EVAL, "attack=fgsm", f"attack.eps={eps}", "latent=null",
                   "detection.pairs=all", f"detection.repeats={repeats}")
    results, objects = evaluate(cfg)
    classifier = objects["module"].classifier
    test = objects["datamodule"].dataset("test")
    items = [test[i] for i in range(len(test))]
    x = torch.stack([it["image"] for it in items])
    labels = torch.stack([it["labels"] for it in items])
    with torch.no_grad():
        p_clean = classifier(x).sigmoid()
    top = p_clean.argmax(1)
    rows = torch.arange(len(x))
    x_grad = x.clone().requires_grad_(True)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(classifier(x_grad)[rows, top], labels[rows, top])
    (grad,) = torch.autograd.grad(loss, x_grad)
    adv = (x + eps * grad.sign()).clamp(0, 1)
    with torch.no_grad():
        p_adv = classifier(adv).sigmoid()
    truth = labels[rows, top] > 0.5
    right, fooled = (p_clean[rows, top] > 0.5) == truth, (p_adv[rows, top] > 0.5) != truth
    attack = results["attack"]
    assert attack["eligible_images"] == int(right.sum())
    assert attack["success_rate"] == pytest.approx(float(fooled[right].float().mean()))
    assert attack["flip_rate"] == pytest.approx(float(((p_clean[rows, top] > 0.5) != (p_adv[rows, top] > 0.5)).float().mean()))
    assert attack["perturbation"]["linf"] == pytest.approx(float((adv - x).abs().flatten(1).amax(1).mean()), abs=1e-6)
    groups = [str(group_code(it["patient_id"] or it["id"])) for it in items]
    clean_score, adv_score = p_clean.amax(1).numpy()[:, None], p_adv.amax(1).numpy()[:, None]
    c, a, _ = crossfit_scores(clean_score, adv_score, groups, seed=cfg.seed, repeats=repeats)
    expected = roc_auc_score(np.r_[np.zeros(len(c)), np.ones(len(a))], np.r_[c, a])
    assert results["detection"]["max_prob"]["auroc"] == pytest.approx(expected, abs=1e-9)


def test_detector_scores_chance_when_adversarial_images_are_clean_copies(tmp_path, checkpoint):
    """eps=0: the 'adversarial' images equal the clean ones, so no feature can tell them
    apart; an AUROC away from 0.5 would mean the halves or the labels leak."""
    cfg = eval_cfg(tmp_path, checkpoint, *ATTACK_EVAL, "attack=fgsm", "attack.eps=0.0", "latent=null", "detection.pairs=all")
    results, _ = evaluate(cfg)
    assert results["attack"]["perturbation"]["linf"] == 0.0
    for name in ("ce", "max_prob", "noise_flip"):
        assert results["detection"][name]["auroc"] == pytest.approx(0.5, abs=1e-9), name


def test_detection_without_enough_changed_pairs_is_skipped_and_the_rest_is_kept(tmp_path, checkpoint):
    """eps=0 changes no image: detection cannot be scored, which the results and the report
    say, while the classification and attack results are still written."""
    cfg = eval_cfg(tmp_path, checkpoint, *ATTACK_EVAL, "attack=fgsm", "attack.eps=0.0", "latent=null",
                   "detection.pairs=changed")
    results, _ = evaluate(cfg)
    assert re.search(r"changed attack pairs from at least 4 patients .*got 0 \(0 pairs\).*attack.eps",
                     results["detection"]["skipped"])
    for name in ("ce", "max_prob", "noise_flip", "combined"):  # the contract's keys stay, unscored
        assert math.isnan(results["detection"][name]["auroc"]) and math.isnan(results["detection"][name]["tpr@5fpr"])
        assert results["detection"][name]["n_test"] == 0
    assert problems(results, EVALUATION) == []
    written = read_results(tmp_path / "results.json")
    assert written["attack"]["perturbation"]["linf"] == 0.0
    assert written["detection"]["skipped"] == results["detection"]["skipped"]
    assert "Not scored: detection needs changed attack pairs" in (tmp_path / "report.md").read_text()


def test_bad_detection_settings_fail_before_any_work(tmp_path, checkpoint):
    from hydra.errors import InstantiationException

    cfg = eval_cfg(tmp_path, checkpoint, *ATTACK_EVAL, "attack=fgsm", "detection.detectors.ce.estimator=svm")
    with pytest.raises(InstantiationException, match=r"estimator='svm'(.|\n)*detection.detectors.ce"):
        evaluate(cfg)
    cfg = eval_cfg(tmp_path, checkpoint, *ATTACK_EVAL, "attack=fgsm", "detection.pairs=some")
    with pytest.raises(ValueError, match="detection.pairs='some'"):
        evaluate(cfg)
    assert not (tmp_path / "results.json").exists()


def test_unknown_attack_target_fails_before_any_work(tmp_path, checkpoint):
    cfg = eval_cfg(tmp_path, checkpoint, *ATTACK_EVAL, "attack=fgsm", "attack.target=Pneumothrax")
    with pytest.raises(ValueError, match="attack.target='Pneumothrax' is not a finding"):
        evaluate(cfg)
    assert not (tmp_path / "results.json").exists()


def _cli(args: list[str], cwd) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, PYTHONWARNINGS="ignore", HYDRA_FULL_ERROR="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_attack_eps_sweep_summary_and_transfer(tmp_path, checkpoint):
    sweep = tmp_path / "sweep"
    args = [str(ROOT / "evaluate.py"), "-m", *TINY_EVAL, *ATTACK_EVAL, f"ckpt_path={checkpoint}", "latent=null",
            "attack=fgsm", "attack.eps=0.01,0.05", "detection.repeats=1", f"hydra.sweep.dir={sweep}"]
    result = _cli(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # the sweep summarised itself (SummarizeSweep callback)
    md = (sweep / "summary.md").read_text()
    assert "attack.eps" in md and "attack.success_rate" in md and "detection.ce.auroc" in md
    assert (sweep / "summary_attack.eps.png").is_file()
    assert (sweep / "transfer.png").is_file() and "Detection transfer" in md
    matrix = np.loadtxt(sweep / "transfer.csv", delimiter=",", skiprows=1, usecols=(1, 2))
    assert matrix.shape == (2, 2) and np.all((matrix >= 0) & (matrix <= 1))
    # the diagonal is each run's own held-out AUROC on its first split; exact, since both sides fit
    # the same sklearn detector on the same saved float64 features (no torch threads involved)
    for i in range(2):
        data = load_detection_data(sweep / str(i) / "detection.npz")
        own = detect(data.features_clean, data.features_adv, data.groups, seed=data.seed).auroc
        assert matrix[i, i] == pytest.approx(own, abs=1e-9)


ADAPTIVE = ["attack=pgd", "attack.eps=0.05", "attack.steps=3", "attack.adaptive=true", "detection.adaptive.images=8",
            "detection.adaptive.weights=[1.0]", "detection.adaptive.steps=2", "detection.detectors.ce.grids=[4]",
            "detection.detectors.ce.window=null",
            "~detection.detectors.mahalanobis"]


def test_adaptive_attacker_who_knows_the_ce_detector(tmp_path, checkpoint):
    cfg = eval_cfg(tmp_path, checkpoint, *ATTACK_EVAL, *ADAPTIVE, "detection.adaptive.against=ce")
    results, objects = evaluate(cfg)
    assert problems(results, EVALUATION) == []
    adaptive = results["detection"]["adaptive"]
    assert adaptive["attacked"] == ["ce"] and adaptive["images"] >= 8 and adaptive["weights"] == [1.0]
    for name in ("ce", "max_prob", "noise_flip", "feature_squeezing", "combined"):  # every detector scored the same pairs
        assert adaptive[name]["n_test"] == adaptive["images"], name  # detection.pairs=all
        assert adaptive[name]["auroc_ci_low"] <= adaptive[name]["auroc"] <= adaptive[name]["auroc_ci_high"]
    evasion, before = adaptive["evasion"], adaptive["non_adaptive_evasion"]
    assert evasion["n"] == adaptive["images"] and adaptive["selective"] is True and adaptive["steps"] == 2
    for name in ("ce", "max_prob", "all"):
        assert evasion[name] <= adaptive["success_rate"] + 1e-12  # evading needs reaching the goal first
        assert adaptive["evasion_difference"][name] == pytest.approx(evasion[name] - before[name], abs=1e-12)
    # unseen by all detectors at once is rarer than unseen by any one of them
    assert evasion["all"] <= min(evasion[n] for n in ("ce", "max_prob", "noise_flip", "feature_squeezing", "combined"))
    # the false positives behind "all at once": any detector flags at least as many clean images
    # as each one, and the same shares come without attacking (clean_flags: same patients, halves)
    flagged = adaptive["clean_flagged"]
    names = ("ce", "max_prob", "noise_flip", "feature_squeezing", "combined")
    assert flagged["n"] == adaptive["images"] and flagged["any"] >= max(flagged[n] for n in names)
    assert flagged["any"] <= min(1.0, sum(flagged[n] for n in names)) + 1e-12
    study = objects["module"].attack
    records = objects["module"].artefacts["attack"]["records"]
    alone = instantiate(cfg.detection.adaptive, against="ce", _convert_="all").clean_flags(study, records)
    assert alone == flagged
    assert adaptive["per_image"]["groups"] and len(adaptive["per_image"]["evaded_all"]) == adaptive["images"]
    report = (tmp_path / "report.md").read_text()
    assert "Against an adaptive attacker (knows ce)" in report and "| all at once |" in report
    assert "| max_prob (not attacked) |" in report


def test_joint_attacker_with_eps_zero_evades_nothing_and_every_auroc_is_chance(tmp_path, checkpoint):
    """eps = 0: the adaptive images are the clean ones. No attack reaches its goal, so nothing
    evades, and every detector scores its clean copies exactly as the clean images (0.5)."""
    cfg = eval_cfg(tmp_path, checkpoint, *ATTACK_EVAL, *ADAPTIVE, "attack.eps=0.0")
    results, _ = evaluate(cfg)
    adaptive = results["detection"]["adaptive"]
    assert adaptive["against"] == "all" and adaptive["not_attacked"] == []
    assert set(adaptive["attacked"]) == {"ce", "max_prob", "noise_flip", "feature_squeezing", "combined"}
    assert adaptive["success_rate"] == 0.0
    for name in ("ce", "max_prob", "noise_flip", "feature_squeezing", "combined", "all"):
        assert adaptive["evasion"][name] == 0.0 and adaptive["non_adaptive_evasion"][name] == 0.0, name
    for name in ("ce", "max_prob", "noise_flip", "feature_squeezing", "combined"):
        assert adaptive[name]["auroc"] == 0.5 and adaptive[name]["n_test"] == adaptive["images"], name


def test_evasion_rates_and_their_paired_difference_by_hand():
    from types import SimpleNamespace

    from causal_ie.attacks.adaptive_study import AdaptiveStudy

    evaded = {"adaptive": {"ce": [np.array([1, 0, 1]), np.array([1, 1, 0, 1, 1])],
                           "all": [np.array([1, 0, 0]), np.array([0, 1, 0, 1, 0])]},
              "non_adaptive": {"ce": [np.array([0, 0, 1]), np.array([0, 1, 0, 0, 0])],
                               "all": [np.array([0, 0, 0]), np.array([0, 0, 0, 0, 0])]}}
    groups = ["a", "b", "c", "d", "e", "f", "g", "h"]
    out = AdaptiveStudy._evasion(evaded, groups, SimpleNamespace(n_boot=500, seed=0))
    assert out["evasion"]["n"] == 8
    assert out["evasion"]["ce"] == pytest.approx(6 / 8) and out["non_adaptive_evasion"]["ce"] == pytest.approx(2 / 8)
    assert out["evasion_difference"]["ce"] == pytest.approx(4 / 8)
    low, high = out["evasion_difference"]["ce_ci_low"], out["evasion_difference"]["ce_ci_high"]
    assert low <= 0.5 <= high and low > 0
    assert out["evasion"]["all"] == pytest.approx(3 / 8) and out["non_adaptive_evasion"]["all"] == 0.0
