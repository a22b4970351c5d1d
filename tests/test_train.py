"""train(cfg) end to end on tiny SyntheticCXR: every model, resume, DDP on CPU, sweeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from causal_ie.models import Classifier
from causal_ie.training import train
from conftest import ROOT, TINY_TRAIN


@pytest.mark.parametrize("model", ["tiny", "resnet18", "densenet121", "resnet50", "efficientnet_b0"])
def test_fast_dev_run_every_model(train_cfg, model):
    cfg = train_cfg(f"model={model}", "debug=fast", "data.batch_size=4")
    metrics, objects = train(cfg)
    assert "train/loss" in metrics and torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert objects["model"].hparams.backbone == cfg.model.backbone


def test_train_tests_and_saves_a_loadable_best_checkpoint(train_cfg, tmp_path):
    cfg = train_cfg()
    metrics, objects = train(cfg)
    assert 0.0 <= metrics["val/auroc_mean"] <= 1.0
    assert "test/auroc_mean" in metrics and "test/auroc/Nodule" in metrics
    summary = json.loads((tmp_path / "train_metrics.json").read_text())
    best = Path(summary["best_checkpoint"])
    assert best.name == "best.ckpt" and best.is_file()
    model = Classifier.load(best)  # weights_only=True
    x = torch.rand(2, 1, 32, 32)
    assert model(x).shape == (2, 14)


def test_resume_from_checkpoint_continues_training(train_cfg, tmp_path):
    metrics, objects = train(train_cfg("test=false"))
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_file()
    steps_first = objects["trainer"].global_step
    cfg = train_cfg("test=false", "trainer.max_epochs=2", f"ckpt_path={last}")
    _, objects = train(cfg)
    trainer = objects["trainer"]
    assert trainer.current_epoch == 2
    assert trainer.global_step == 2 * steps_first  # one more epoch, not a fresh start


def test_auto_pos_weight_comes_from_training_labels(train_cfg):
    cfg = train_cfg("auto_pos_weight=true", "debug=fast")
    _, objects = train(cfg)
    weights = objects["model"].pos_weight
    labels = torch.as_tensor(objects["datamodule"].label_matrix("train"), dtype=torch.float32)
    pos = labels.sum(0).clamp(min=1)
    torch.testing.assert_close(weights, (len(labels) - labels.sum(0)) / pos)


def _cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", HYDRA_FULL_ERROR="1")
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


def _cli_overrides() -> list[str]:
    # the same tiny overrides the in-process tests compose
    return list(TINY_TRAIN)


@pytest.mark.slow
def test_ddp_cpu_two_processes(tmp_path):
    run_dir = tmp_path / "run"
    result = _cli(_cli_overrides() + ["trainer=ddp_cpu", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "train_metrics.json").read_text())
    assert Path(summary["best_checkpoint"]).is_file()
    assert "test/auroc_mean" in summary["metrics"]
    assert "world_size=2" in result.stderr + result.stdout or "GLOBAL_RANK: 1" in result.stderr + result.stdout


@pytest.mark.slow
def test_a_failing_sweep_point_does_not_stop_the_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    result = _cli(
        ["-m", *_cli_overrides(), "data.image_size=4,32", "test=false", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data.image_size must be >= 8" in (sweep / "0" / "error.txt").read_text()
    assert (sweep / "1" / "train_metrics.json").is_file()
