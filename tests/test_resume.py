"""Resumable evaluation: a run stopped by a signal saves its test loop and exits non-zero; the
same command continues it, and its results equal an uninterrupted run's, number for number."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from conftest import ROOT, TINY_EVAL, eval_cfg

from causal_ie.evaluation import evaluate
from causal_ie.lightning.resume import STATE_DIR, EvaluationStopped, ResumeRefused
from causal_ie.outputs.results import flatten, read_results

# the attack study on 24 images in 6 batches of 4 (CE, CAM, faithfulness and detection states)
RESUMABLE = ["data.batch_size=4", "detection.test_images=24", "attack=pgd", "attack.eps=0.05", "attack.steps=2",
             "cams=[gradcam]", "detection.n_boot=100", "evaluation.n_boot=100", "detection.reference_images=16",
             "detection.detectors.ce.latent_layer=null", "detection.pairs=all", "latent=null",
             "evaluation.checkpoint_every=1"]


class SignalAt(L.Callback):
    """Sends this process ``signum`` when test batch ``batch`` starts (as a scheduler would mid-batch)."""

    def __init__(self, batch: int, signum: int = signal.SIGTERM):
        self.batch, self.signum = batch, signum

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == self.batch:
            os.kill(os.getpid(), self.signum)


def _run(cfg, stop_at: int | None = None, signum: int = signal.SIGTERM):
    """evaluate(cfg), with a signal sent at test batch ``stop_at``."""
    if stop_at is None:
        return evaluate(cfg)
    import causal_ie.evaluation as evaluation

    build = evaluation.build_callbacks
    evaluation.build_callbacks = lambda c: [*build(c), SignalAt(stop_at, signum)]
    try:
        return evaluate(cfg)
    finally:
        evaluation.build_callbacks = build


def _numbers(results: dict) -> dict:
    flat = flatten(results)
    flat.pop("run.checkpoint", None)
    return flat


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], float) and math.isnan(a[key]):
            assert isinstance(b[key], float) and math.isnan(b[key]), key
        else:
            assert a[key] == b[key], f"{key}: {a[key]!r} != {b[key]!r}"  # exact: the same computation


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, checkpoint):
    out = tmp_path_factory.mktemp("uninterrupted")
    results, _ = evaluate(eval_cfg(out, checkpoint, *RESUMABLE))
    assert not (out / STATE_DIR).exists()  # deleted once results.json is written
    return _numbers(read_results(out / "results.json"))


# stopped after the second batch with a save every batch; after the fifth with saves only on the signal
@pytest.mark.parametrize("stop_at,every", [(1, 1), (4, 100)])
def test_a_stopped_evaluation_resumes_to_the_uninterrupted_results(tmp_path, checkpoint, uninterrupted, stop_at, every):
    periodic = [f"evaluation.checkpoint_every={every}", "evaluation.checkpoint_minutes=60"]
    with pytest.raises(EvaluationStopped) as stopped:
        _run(eval_cfg(tmp_path, checkpoint, *RESUMABLE, *periodic), stop_at=stop_at)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert stopped.value.batches == stop_at + 1  # the batch in progress finished, then the state was saved
    saved = torch.load(tmp_path / STATE_DIR / "rank0.pt", weights_only=False)
    assert saved["batches"] == stop_at + 1 and not saved["complete"]
    assert not (tmp_path / "results.json").exists()
    # the same command, the same run directory: it continues
    results, objects = evaluate(eval_cfg(tmp_path, checkpoint, *RESUMABLE))
    assert objects["module"].resumed_batches == stop_at + 1
    _same(_numbers(read_results(tmp_path / "results.json")), uninterrupted)
    assert not (tmp_path / STATE_DIR).exists()


def test_a_resume_with_changed_settings_is_refused_naming_them(tmp_path, checkpoint):
    with pytest.raises(EvaluationStopped):
        _run(eval_cfg(tmp_path, checkpoint, *RESUMABLE), stop_at=1, signum=signal.SIGUSR1)
    changed = eval_cfg(tmp_path, checkpoint, *RESUMABLE, "attack.eps=0.06", "mask.size=4")
    with pytest.raises(ResumeRefused, match=r"attack\.eps: 0\.05 -> 0\.06.*mask\.size: 8 -> 4|mask\.size.*attack\.eps"):
        evaluate(changed)
    # a setting that changes no number (how often it saves) may change
    results, objects = evaluate(eval_cfg(tmp_path, checkpoint, *RESUMABLE, "evaluation.checkpoint_every=3"))
    assert objects["module"].resumed_batches == 2


def test_resume_dir_continues_a_stopped_run_in_its_own_directory(tmp_path, checkpoint, uninterrupted):
    first, second = tmp_path / "first", tmp_path / "second"
    with pytest.raises(EvaluationStopped):
        _run(eval_cfg(first, checkpoint, *RESUMABLE), stop_at=2, signum=signal.SIGINT)
    evaluate(eval_cfg(second, checkpoint, *RESUMABLE, f"resume={first}"))
    _same(_numbers(read_results(first / "results.json")), uninterrupted)
    assert not (second / "results.json").exists()
    with pytest.raises(FileNotFoundError, match=r"resume=.*first.*results\.json \(it finished\)"):
        evaluate(eval_cfg(second, checkpoint, *RESUMABLE, f"resume={first}"))


@pytest.mark.slow
def test_evaluate_py_stopped_by_sigterm_exits_non_zero_and_the_same_command_resumes(tmp_path, checkpoint, uninterrupted):
    run_dir = tmp_path / "run"
    args = [sys.executable, str(ROOT / "evaluate.py"), *TINY_EVAL, *RESUMABLE, f"ckpt_path={checkpoint}",
            f"hydra.run.dir={run_dir}"]
    # as many threads as this process: float32 sums over another thread count differ in the last digits
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(torch.get_num_threads()))
    process = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state = run_dir / STATE_DIR / "rank0.pt"
    deadline = time.time() + 600
    while not state.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()[0][-3000:]
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "stopped by SIGTERM" in output and not (run_dir / "results.json").exists()
    again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming the evaluation" in again.stdout + again.stderr
    _same(_numbers(json.loads((run_dir / "results.json").read_text())), uninterrupted)


@pytest.mark.slow
def test_ddp_cpu_shards_are_saved_per_process_and_each_resumes(tmp_path, checkpoint):
    # FGSM: no random start, so one process and two attack the same images alike
    settings = [s for s in RESUMABLE if not s.startswith("attack.steps")] + ["attack=fgsm"]
    evaluate(eval_cfg(tmp_path / "one", checkpoint, *settings))
    uninterrupted = _numbers(read_results(tmp_path / "one" / "results.json"))
    run_dir = tmp_path / "run"
    args = [sys.executable, str(ROOT / "evaluate.py"), *TINY_EVAL, *settings, f"ckpt_path={checkpoint}",
            "trainer=ddp_cpu", f"hydra.run.dir={run_dir}"]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    process = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    shards = [run_dir / STATE_DIR / f"rank{r}.pt" for r in (0, 1)]
    deadline = time.time() + 600
    while not all(p.exists() for p in shards) and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()[0][-3000:]
    process.send_signal(signal.SIGTERM)  # to the launching process (rank 0): it passes it on
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    saved = [torch.load(p, weights_only=False) for p in shards]
    assert [s["world_size"] for s in saved] == [2, 2] and not any(s["complete"] for s in saved)
    # one process cannot continue two shards
    with pytest.raises(ResumeRefused, match=r"saved by 2 process\(es\), this run has 1"):
        evaluate(eval_cfg(tmp_path, checkpoint, *settings, f"resume={run_dir}"))
    again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = _numbers(json.loads((run_dir / "results.json").read_text()))
    # each gloo process runs with half the threads: float32 rounding as in test_evaluate's DDP test
    # (abs 1e-5 on scores in [0, 1]; the detectors, fitted on rows gathered in another order, 1e-4)
    for key, value in uninterrupted.items():
        if isinstance(value, float) and not key.startswith("run."):
            tolerance = 1e-4 if key.startswith("detection.") else 1e-5
            assert resumed[key] == pytest.approx(value, abs=tolerance, nan_ok=True), key
        elif not key.startswith("run."):
            assert resumed[key] == value, key


# the joint adaptive attacker on 8 images in batches of 2, two lambdas, with the randomised
# noise_flip detector (EOT draws from its own generator): 4 halves' batches per lambda
ADAPTIVE = [s for s in RESUMABLE if not s.startswith(("attack.", "detection.detectors.ce.", "cams", "detection.test"))] + [
    "cams=[]", "evaluation.faithfulness=false", "detection.test_images=16", "~detection.detectors.feature_squeezing",
    "attack.eps=0.05", "attack.steps=2", "attack.adaptive=true", "detection.adaptive.images=8",
    "detection.adaptive.batch_size=2", "detection.adaptive.weights=[0.01,1.0]", "detection.adaptive.steps=2",
    "detection.adaptive.eot_samples=2", "detection.detectors.ce.grids=[4]", "detection.detectors.ce.window=null",
    "detection.detectors.ce.latent_layer=null", "~detection.detectors.mahalanobis"]


@pytest.mark.slow
def test_a_stop_in_the_adaptive_study_resumes_to_the_uninterrupted_results(tmp_path, checkpoint, monkeypatch):
    stop_at = 2  # in the first half: the rest of its attack, then the second half from the saved draws
    import causal_ie.lightning.resume as resume

    evaluate(eval_cfg(tmp_path / "whole", checkpoint, *ADAPTIVE))
    whole = _numbers(read_results(tmp_path / "whole" / "results.json"))
    assert whole["detection.adaptive.images"] == 8
    progress = resume.AdaptiveCheckpoint.__call__

    def signalled(self, state):
        if self.calls + 1 == stop_at:  # a signal while this batch was attacked
            os.kill(os.getpid(), signal.SIGTERM)
        progress(self, state)

    monkeypatch.setattr(resume.AdaptiveCheckpoint, "__call__", signalled)
    with pytest.raises(EvaluationStopped, match=f"after {stop_at} adaptive-attack batch"):
        evaluate(eval_cfg(tmp_path / "run", checkpoint, *ADAPTIVE))
    assert (tmp_path / "run" / STATE_DIR / "adaptive.pt").is_file()
    assert "adaptive" not in read_results(tmp_path / "run" / "results.json")["detection"]  # written before it
    monkeypatch.setattr(resume.AdaptiveCheckpoint, "__call__", progress)
    evaluate(eval_cfg(tmp_path / "run", checkpoint, *ADAPTIVE))
    _same(_numbers(read_results(tmp_path / "run" / "results.json")), whole)
    assert not (tmp_path / "run" / STATE_DIR).exists()
