"""evaluate.py end to end: real configs, a tiny trained checkpoint, results.json + report.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY_EVAL, compose_config, eval_cfg
from hydra.core.global_hydra import GlobalHydra

from causal_ie.evaluation import evaluate
from causal_ie.outputs.results import flatten


def test_evaluate_writes_results_and_report(tmp_path, checkpoint):
    results, objects = evaluate(eval_cfg(tmp_path, checkpoint))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert 0.0 <= saved["classification"]["auroc_mean"] <= 1.0
    assert set(saved["classification"]["auroc"]) == set(objects["datamodule"].findings)
    for method in ("ce", "ce_latent", "gradcam"):
        loc = saved["localisation"][method]
        for key in ("pointing_game", "energy_pointing_game", "iobb@0.1", "iobb@0.7", "iou@0.5"):
            assert 0.0 <= loc[key] <= 1.0, (method, key)
        faith = saved["faithfulness"][method]
        assert 0.0 <= faith["deletion_auc"] <= 1.0 and 0.0 <= faith["insertion_auc"] <= 1.0
    assert saved["localisation_pairs"] > 0
    report = (tmp_path / "report.md").read_text()
    pngs = list((tmp_path / "figures").glob("*.png"))
    assert pngs and all(f"figures/{p.name}" in report for p in pngs)
    assert "| ce |" in report and "| gradcam |" in report


@pytest.mark.parametrize("mask", ["pixel", "superpixel", "latent"])
def test_every_mask_config_runs(tmp_path, checkpoint, mask):
    overrides = ["data.test_subset=4", "cams=[]", "latent=null", "evaluation.faithfulness=false", f"mask={mask}"]
    if mask == "superpixel":
        overrides.append("mask.n_segments=16")
    results, _ = evaluate(eval_cfg(tmp_path, checkpoint, *overrides))
    assert 0.0 <= results["localisation"]["ce"]["pointing_game"] <= 1.0
    assert results["run"]["mask"] == mask


def test_mismatched_checkpoint_and_bad_settings_are_named(tmp_path, checkpoint):
    with pytest.raises(ValueError, match="image_size=32 but data.image_size=48"):
        evaluate(eval_cfg(tmp_path, checkpoint, "data.image_size=48", "mask.size=4"))
    with pytest.raises(ValueError, match="window"):
        evaluate(eval_cfg(tmp_path, checkpoint, "mask.size=64"))
    with pytest.raises(ValueError, match="no_such_layer"):
        evaluate(eval_cfg(tmp_path, checkpoint, "latent.layer=no_such_layer"))
    with pytest.raises(FileNotFoundError, match="ckpt_path"):
        evaluate(eval_cfg(tmp_path, tmp_path / "missing.ckpt"))


def _cli(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", HYDRA_FULL_ERROR="1", WANDB_MODE="offline", WANDB_SILENT="true")
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


@pytest.mark.slow
def test_ddp_cpu_evaluation_equals_one_process(tmp_path, checkpoint):
    # FGSM is deterministic, so the attacked half of the study must match as well
    args = [*TINY_EVAL, f"ckpt_path={checkpoint}", "data.test_subset=13", "cams=[gradcam]", "attack=fgsm",
            "attack.eps=0.02"]
    one = _cli("evaluate.py", [*args, f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _cli("evaluate.py", [*args, "trainer=ddp_cpu", f"hydra.run.dir={tmp_path / 'two'}"], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    r1 = json.loads((tmp_path / "one" / "results.json").read_text())
    r2 = json.loads((tmp_path / "two" / "results.json").read_text())
    assert r2["localisation_pairs"] == r1["localisation_pairs"]
    for section in ("classification", "localisation", "faithfulness", "attack", "ce_under_attack"):
        assert flatten(r2[section]) == pytest.approx(flatten(r1[section]), abs=1e-5, nan_ok=True), section
    # the detectors are fitted on the gathered rows, which arrive in another order
    assert flatten(r2["detection"]) == pytest.approx(flatten(r1["detection"]), abs=1e-4, nan_ok=True)


@pytest.mark.slow
def test_wandb_offline_run_holds_the_ce_map_images(tmp_path, checkpoint):
    run = tmp_path / "run"
    result = _cli(
        "evaluate.py",
        [*TINY_EVAL, f"ckpt_path={checkpoint}", "logger=wandb", "data.test_subset=6", "attack=fgsm",
         "attack.eps=0.05", f"hydra.run.dir={run}"],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    media = list(run.glob("wandb/offline-run-*/files/media/images/**/*.png"))
    assert media, sorted(str(p.relative_to(run)) for p in run.rglob("*"))[:50]
    # the attack study's figures (clean vs adversarial maps, histograms, ROC) are logged too
    assert any("attack" in str(p) for p in media), sorted(str(p.relative_to(run)) for p in media)
    assert (run / "figures").is_dir()


@pytest.mark.slow
def test_mask_size_multirun_and_summary(tmp_path, checkpoint):
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY_EVAL, f"ckpt_path={checkpoint}", "data.test_subset=4", "cams=[]", "latent=null",
            "evaluation.faithfulness=false", "mask.size=4,8", f"hydra.sweep.dir={sweep}"]
    result = _cli("evaluate.py", args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (sweep / "0" / "results.json").is_file() and (sweep / "1" / "results.json").is_file()
    summary = subprocess.run(
        [sys.executable, "-m", "causal_ie.report", "summarize", str(sweep)], capture_output=True, text=True
    )
    assert summary.returncode == 0, summary.stderr
    assert "mask.size" in (sweep / "summary.md").read_text()
    assert (sweep / "summary_mask.size.png").is_file()
