"""evaluate.py end to end: real configs, a tiny trained checkpoint, results.json + report.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_EVAL, compose_config, eval_cfg

from causal_ie.data import FINDINGS
from causal_ie.data.errors import DataError
from causal_ie.evaluation import evaluate
from causal_ie.outputs.results import flatten
from causal_ie.outputs.schema import EVALUATION, problems


def test_evaluate_writes_results_and_report(tmp_path, checkpoint):
    results, objects = evaluate(eval_cfg(tmp_path, checkpoint))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert problems(saved, EVALUATION) == []  # every key is described in the schema (docs/results.md)
    assert {k for k in saved["classification"]["auroc"] if "_ci_" not in k} == set(objects["datamodule"].findings)
    # the pairs are the test images' present findings that have a box
    test = objects["datamodule"].dataset("test")
    items = [test[i] for i in range(len(test))]
    expected = sum(int(((it["labels"] > 0.5) & ~it["boxes"].isnan().any(-1)).sum()) for it in items)
    assert saved["localisation_pairs"] == expected > 0
    assert saved["classification"]["num_images"] == len(items) == 12
    for method in ("ce", "ce_latent", "gradcam"):
        assert saved["localisation"][method]["pairs"] == expected
        assert set(saved["faithfulness"][method]) == {"deletion_auc", "insertion_auc"}
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
    assert results["localisation"]["ce"]["pairs"] == results["localisation_pairs"] > 0
    assert problems(results, EVALUATION) == []
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


def test_a_checkpoint_folder_and_a_missing_data_root_are_named(tmp_path, checkpoint):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("best.ckpt", "last.ckpt"):
        (run / "checkpoints" / name).write_bytes(checkpoint.read_bytes())
    with pytest.raises(FileNotFoundError, match=r"is a directory, not a checkpoint file; it holds "
                                                 r"checkpoints/best\.ckpt, checkpoints/last\.ckpt"):
        evaluate(eval_cfg(tmp_path, run))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"is a directory, not a checkpoint file; it holds no \.ckpt file"):
        evaluate(eval_cfg(tmp_path, tmp_path / "empty"))
    # the 32 px checkpoint against NIH at 48 px: the missing folder is reported, not the size
    # (hydra wraps the error of the data config's constructor, message and cause kept)
    with pytest.raises(Exception, match=r"data.root='/nonexistent' does not exist") as raised:
        evaluate(compose_config("evaluate", ["data=nih", "data.root=/nonexistent", "data.image_size=48", "logger=none",
                                             f"ckpt_path={checkpoint}"], tmp_path))
    assert isinstance(raised.value.__cause__ or raised.value, DataError)


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
    # Each gloo process runs with half the threads (Lightning's DDP set-up), so convolutions reduce
    # in another order and logits, CE maps and deletion curves differ by float32 rounding (~1e-7
    # relative). abs 1e-5 on scores in [0, 1] leaves room for that over the averaging of 13 images,
    # while one image scored differently moves a mean by more than 1e-2.
    for section in ("classification", "localisation", "faithfulness", "attack", "ce_under_attack"):
        assert flatten(r2[section]) == pytest.approx(flatten(r1[section]), abs=1e-5, nan_ok=True), section
    # the detectors are fitted on the gathered rows, which arrive in another order: lbfgs sums the
    # rows in that order, so its coefficients differ by more than the features' rounding
    assert flatten(r2["detection"]) == pytest.approx(flatten(r1["detection"]), abs=1e-4, nan_ok=True)


@pytest.mark.slow
def test_ddp_cpu_with_fewer_test_images_than_processes_equals_one_process(tmp_path, checkpoint):
    # one image, two processes: the second has an empty shard and contributes nothing (it used to
    # fail Lightning's UnrepeatedDistributedSampler assertion, then the gloo sync of empty states)
    args = [*TINY_EVAL, f"ckpt_path={checkpoint}", "data.test_subset=1", "cams=[gradcam]", "attack=fgsm",
            "attack.eps=0.02", "detection.test_images=1"]
    one = _cli("evaluate.py", [*args, f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _cli("evaluate.py", [*args, "trainer=ddp_cpu", f"hydra.run.dir={tmp_path / 'two'}"], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    r1 = json.loads((tmp_path / "one" / "results.json").read_text())
    r2 = json.loads((tmp_path / "two" / "results.json").read_text())
    assert r2["classification"]["num_images"] == r1["classification"]["num_images"] == 1
    assert r2["localisation_pairs"] == r1["localisation_pairs"]
    # the image is scored by one process in both runs, but with half the threads under DDP (float32
    # rounding, ~1e-7 relative; see the test above)
    for section in ("classification", "localisation", "faithfulness", "attack", "ce_under_attack"):
        assert flatten(r2[section]) == pytest.approx(flatten(r1[section]), abs=1e-5, nan_ok=True), section


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


# -- exact values on a model that only looks at its boxes -----------------------------------------
SIDE, CELL = 28, 4  # 7 x 7 cells of 4 px; finding k's box is cell (row 0 or 3, column k % 7)


def finding_box(k: int) -> list[float]:
    return [float((k % 7) * CELL), float((k // 7) * 3 * CELL), float(CELL), float(CELL)]


class BoxModel(torch.nn.Module):
    """logit_k = 10 * (mean of the image over finding k's box) - 5: +5 with the box lit, -5 without."""

    def __init__(self):
        super().__init__()
        self.findings = FINDINGS
        masks = torch.zeros(len(FINDINGS), SIDE, SIDE)
        for k in range(len(FINDINGS)):
            x, y, w, h = (int(v) for v in finding_box(k))
            masks[k, y : y + h, x : x + w] = 1 / (w * h)
        self.register_buffer("masks", masks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10 * torch.einsum("nchw,khw->nk", x, self.masks) - 5


def box_batches(n: int = 8) -> list[dict]:
    """Image i lights the boxes of findings with (i + k) % 3 == 0: every finding present and absent."""
    items = []
    for i in range(n):
        image = torch.zeros(1, SIDE, SIDE)
        labels = torch.zeros(len(FINDINGS))
        boxes = torch.full((len(FINDINGS), 4), float("nan"))
        for k in range(len(FINDINGS)):
            if (i + k) % 3 == 0:
                x, y, w, h = (int(v) for v in finding_box(k))
                image[0, y : y + h, x : x + w] = 1.0
                labels[k] = 1.0
                boxes[k] = torch.tensor(finding_box(k))
        items.append({"image": image, "labels": labels, "boxes": boxes, "id": f"img{i}", "patient_id": f"p{i}"})
    return items


class FlatMap:
    """An explainer that sees nothing: all-zero maps."""

    kind = "flat"

    def __call__(self, model, images, img_idx, finding_idx):
        return images.new_zeros((len(img_idx), *images.shape[-2:]))


def test_evaluation_scores_a_model_that_only_looks_at_its_boxes_exactly():
    import lightning as L
    from torch.utils.data import DataLoader

    from causal_ie.explain.explainers import PatchCE
    from causal_ie.interventions import InterventionSpec
    from causal_ie.lightning.evaluation import CEEvaluation

    items = box_batches()
    explainers = {"ce": PatchCE(size=CELL, stride=CELL), "flat": FlatMap()}
    module = CEEvaluation(BoxModel(), explainers, deletion_steps=4, deletion=InterventionSpec(baseline="zero"))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        inference_mode=False)
    trainer.test(module, dataloaders=DataLoader(items, batch_size=3))
    results = module.results
    pairs = sum(int(item["labels"].sum()) for item in items)
    assert results["localisation_pairs"] == pairs == 37
    # lit boxes give logit +5, dark ones -5: every finding perfectly ranked
    auroc = results["classification"]["auroc"]
    assert {f: auroc[f] for f in FINDINGS} == {f: 1.0 for f in FINDINGS}
    # perfect in every resample: a zero-width interval
    assert results["classification"]["auroc_mean_ci_low"] == results["classification"]["auroc_mean_ci_high"] == 1.0
    ce = results["localisation"]["ce"]
    # occluding a window changes only the finding whose box it is: the map is positive on the box
    # alone, so its peak, its thresholded region and its box are the lesion box
    assert ce["pointing_game"] == 1.0 and ce["energy_pointing_game"] == pytest.approx(1.0)
    assert ce["iou@0.7"] == 1.0 and ce["iobb@0.7"] == 1.0 and ce["iou_mean"] == pytest.approx(1.0)
    # a flat map ties everywhere: it scores the box's share of the image, like a random guess
    flat = results["localisation"]["flat"]
    assert flat["pointing_game"] == pytest.approx(CELL * CELL / SIDE**2)
    assert flat["energy_pointing_game"] == 0.0
    # every pair scores the same, so the intervals have no width, and CE beats the flat map by
    # exactly the difference of the two constants
    assert ce["pointing_game_ci_low"] == ce["pointing_game_ci_high"] == 1.0
    assert flat["pointing_game_ci_low"] == pytest.approx(flat["pointing_game"])
    minus = ce["minus"]["flat"]
    assert minus["pointing_game"] == pytest.approx(1 - CELL * CELL / SIDE**2)
    assert minus["pointing_game_ci_low"] == pytest.approx(minus["pointing_game"])
    assert "minus" not in flat  # only CE methods are compared with the others
    # deletion (zero baseline, 4 steps of 196 pixels): the box goes in the first step, so the
    # curve is s(5), s(-5), s(-5), s(-5), s(-5); insertion mirrors it (s: sigmoid)
    low = torch.sigmoid(torch.tensor(-5.0)).item()
    assert results["faithfulness"]["ce"]["deletion_auc"] == pytest.approx(0.25 * (0.5 + 3 * low), abs=1e-6)
    assert results["faithfulness"]["ce"]["insertion_auc"] == pytest.approx(0.25 * (0.5 + 3 * (1 - low)), abs=1e-6)


def test_nan_logits_and_nan_pixels_stop_the_evaluation_with_what_they_hit(tmp_path, checkpoint):
    ckpt = torch.load(checkpoint, weights_only=True)
    head = [k for k, v in ckpt["state_dict"].items() if k.endswith(".weight") and v.dim() == 2][-1]
    ckpt["state_dict"][head] = torch.full_like(ckpt["state_dict"][head], float("nan"))
    broken = tmp_path / "nan_head.ckpt"
    torch.save(ckpt, broken)
    with pytest.raises(ValueError, match=rf"checkpoint {broken} returns NaN or Inf logits for Atelectasis, "
                                         r"Cardiomegaly, .*, Hernia on 12 of 12 images"):
        evaluate(eval_cfg(tmp_path, broken))
    assert not (tmp_path / "results.json").exists()

    from causal_ie.explain.cam import CAMExplainer
    from causal_ie.lightning.evaluation import CEEvaluation
    from causal_ie.models import Classifier

    module = CEEvaluation(Classifier.load(checkpoint), {"gradcam": CAMExplainer("gradcam")})
    images = torch.rand(3, 1, 32, 32)
    images[1, 0, 4, 4] = float("nan")
    with pytest.raises(ValueError, match=r"1 test image\(s\) hold NaN or Inf pixels \(e.g. b\)"):
        module._check_finite({"id": ["a", "b", "c"]}, images, torch.zeros(3, 14))
