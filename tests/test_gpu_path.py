"""The GPU path, checked on the CPU: precision settings (bf16-mixed, 64-true), measurements in
float32 under autocast, the latent autoencoder fitted inside CEEvaluation's on_test_start on the
classifier's device and dtype (and shared by rank 0 under DDP), channels_last, the devices of
the counterfactual command."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ROOT, TINY_DATA, TINY_EVAL, compose_config, eval_cfg
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from causal_ie.data.sources import SyntheticDataModule
from causal_ie.explain.explainers import LatentCE, PatchCE
from causal_ie.explain.metrics import DeletionInsertion
from causal_ie.interventions import InterventionSpec, causal_effect, latent_effect
from causal_ie.interventions import autoencoder as autoencoder_module
from causal_ie.interventions.autoencoder import AutoencoderCache, cache_path
from causal_ie.lightning.evaluation import CEEvaluation, fit_autoencoders
from causal_ie.models import Classifier
from causal_ie.outputs.results import flatten
from causal_ie.precision import autocast, full_precision, parse_precision, search_autocast_dtype

BF16 = "trainer.precision=bf16-mixed"


def _finite(values: dict, *keys: str) -> None:
    for key in keys:
        assert isinstance(values[key], float) and math.isfinite(values[key]), (key, values[key])


@pytest.fixture(scope="module")
def trained() -> Classifier:
    return Classifier(backbone="test_resnet", image_size=32).eval()


@pytest.fixture
def tiny_images() -> torch.Tensor:
    return torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- precision names and regions


def test_precision_names():
    assert parse_precision("bf16-mixed") == (torch.float32, torch.bfloat16)
    assert parse_precision("16-mixed") == (torch.float32, torch.float16)
    assert parse_precision(None) == parse_precision("32-true") == parse_precision(32) == (torch.float32, None)
    assert parse_precision("64-true") == (torch.float64, None)
    # searches outside training use bfloat16 only: float16 input gradients underflow without loss scaling
    assert search_autocast_dtype("bf16-mixed") == torch.bfloat16
    assert search_autocast_dtype("16-mixed") is None and search_autocast_dtype("32-true") is None
    with pytest.raises(ValueError, match="trainer.precision='fp8'.*bf16-mixed"):
        parse_precision("fp8")


def test_every_trainer_config_names_a_precision_the_commands_understand(tmp_path):
    for trainer in ("cpu", "gpu", "ddp", "ddp_cpu"):
        cfg = compose_config("evaluate", [f"trainer={trainer}"], tmp_path)
        parse_precision(cfg.trainer.precision)
    assert compose_config("train", [], tmp_path).trainer.precision == "32-true"  # the default
    GlobalHydra.instance().clear()


def test_ce_maps_in_full_precision_inside_autocast_equal_the_float32_maps(checkpoint, tiny_images):
    """Why measurements leave autocast: on the trained 32 px model bf16 moves the CE maps by a
    large share of their size, while full_precision inside an autocast region gives the float32
    maps bit for bit."""
    model = Classifier.load(checkpoint)
    x = tiny_images
    for name, ce in {
        "patch": lambda: causal_effect(model, x, window=8, stride=4),
        "latent": lambda: latent_effect(model, x, as_maps=True),
    }.items():
        reference = ce()
        with autocast(torch.bfloat16, "cpu"):
            bf16 = ce()
            with full_precision("cpu"):
                exact = ce()
        assert torch.equal(exact, reference), name
        assert exact.dtype == torch.float32 and bf16.dtype == torch.bfloat16
        assert torch.isfinite(bf16).all()
        diff = float((bf16.float() - reference).abs().max())
        print(f"{name}: max |CE| {float(reference.abs().max()):.2e}, bf16 vs float32 max |diff| {diff:.2e}")
        assert diff > 0


def test_deletion_curves_are_measured_in_float32_under_autocast(trained, tiny_images):
    maps = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    finding = torch.tensor([0, 3, 5])
    metric = DeletionInsertion(trained, n_steps=4, intervention=InterventionSpec(baseline="blur", batch_size=16))
    reference = metric.curves(tiny_images, maps, finding)
    with autocast(torch.bfloat16, "cpu"):
        under_autocast = metric.curves(tiny_images, maps, finding)
    for a, b in zip(reference, under_autocast):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- the commands under bf16-mixed


def test_train_under_bf16_mixed(train_cfg):
    from causal_ie.training import train

    cfg = train_cfg(BF16, "auto_pos_weight=true", "train=true", "test=true")
    metrics, objects = train(cfg)
    assert objects["trainer"].precision == "bf16-mixed"
    assert math.isfinite(metrics["val/auroc_mean"]) and math.isfinite(metrics["test/auroc_mean"])
    assert math.isfinite(metrics["train/loss"])
    # the weights stay float32 (mixed precision casts per operation)
    assert next(objects["model"].parameters()).dtype == torch.float32


@pytest.mark.slow  # the attack study's detectors take a while even on 10 images
def test_evaluate_with_an_attack_under_bf16_mixed_is_finite(tmp_path, checkpoint):
    from causal_ie.evaluation import evaluate

    cfg = eval_cfg(
        tmp_path, checkpoint, BF16, "attack=fgsm", "attack.eps=0.03", "detection.pairs=all", "detection.test_images=10",
        "detection.reference_images=16", "detection.n_boot=100", "detection.repeats=1",
    )
    try:
        results, objects = evaluate(cfg)
    finally:
        GlobalHydra.instance().clear()
    assert objects["trainer"].precision == "bf16-mixed"
    flat = flatten(results)
    _finite(flat, "classification.auroc_mean", "localisation.ce.pointing_game", "localisation.ce_latent.pointing_game",
            "localisation.gradcam.pointing_game", "faithfulness.ce.deletion_auc", "attack.success_rate")
    assert json.loads((tmp_path / "results.json").read_text())["attack"]["name"] == "fgsm"


def _evaluate_flat(tmp_path: Path, checkpoint: Path, *overrides: str) -> dict:
    from causal_ie.evaluation import evaluate

    # CAMs run with autocast off already (causal_ie.explain.cam): left out to keep it short
    cfg = eval_cfg(tmp_path, checkpoint, "data.test_subset=6", "evaluation.deletion_steps=3", "cams=[]", *overrides)
    try:
        results, _ = evaluate(cfg)
    finally:
        GlobalHydra.instance().clear()
    # an AUROC undefined on these 6 images (one class of a finding) is NaN, which == never equals
    return {k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in flatten(results).items()
            if not k.startswith("run.")}


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, checkpoint) -> dict:
    """Flat results of a small evaluate run with the default precision (32-true)."""
    return _evaluate_flat(tmp_path_factory.mktemp("default"), checkpoint)


def test_32_true_is_the_default_and_changes_nothing(tmp_path, checkpoint, default_run):
    explicit = _evaluate_flat(tmp_path, checkpoint, "trainer.precision=32-true")
    assert explicit == default_run


def test_evaluate_under_bf16_mixed_measures_what_32_true_measures(tmp_path, checkpoint, default_run):
    """Lightning runs test_step under autocast with *-mixed; CE maps, AUROCs and curves must not notice."""
    bf16 = _evaluate_flat(tmp_path, checkpoint, BF16)
    for section in ("classification", "localisation", "faithfulness"):
        got = {k: v for k, v in bf16.items() if k.startswith(section)}
        assert got == {k: v for k, v in default_run.items() if k.startswith(section)}, section


def _counterfactuals(tmp_path: Path, checkpoint: Path, *overrides: str) -> dict:
    from causal_ie.counterfactuals.command import run_counterfactuals

    data = [o for o in TINY_DATA if not o.startswith("logger")]
    cfg = compose_config(
        "counterfactuals",
        [*data, f"ckpt_path={checkpoint}", "counterfactual=[svce,apgd]", "counterfactual.steps=4",
         "counterfactual.num_images=1", "counterfactual.finding=[Effusion,Mass]", "counterfactual.figure_rows=2",
         *overrides],
        tmp_path,
    )
    try:
        results, objects = run_counterfactuals(cfg)
    finally:
        GlobalHydra.instance().clear()
    return results, objects


def test_counterfactuals_under_bf16_mixed_search_in_bf16_and_measure_in_float32(tmp_path, checkpoint, monkeypatch):
    seen = []
    original = Classifier.forward

    def forward(self, x):  # record whether each forward ran under autocast
        seen.append(torch.is_autocast_enabled("cpu"))
        return original(self, x)

    monkeypatch.setattr(Classifier, "forward", forward)
    bf16, objects = _counterfactuals(tmp_path / "bf16", checkpoint, BF16)
    assert any(seen) and not all(seen)  # the searches under autocast, the measurements without
    seen.clear()
    fp32, _ = _counterfactuals(tmp_path / "fp32", checkpoint)
    assert not any(seen)
    for method in ("svce", "apgd"):
        b, f = flatten(bf16["counterfactual"][method]), flatten(fp32["counterfactual"][method])
        _finite(b, "confidence_after", "l1_5", "l2")
        assert b["confidence_before"] == f["confidence_before"]  # measured in float32 either way
        assert objects["counterfactuals"][method].z.dtype == torch.float32
    for row in objects["figure_rows"]:
        assert row["ce"].dtype.name == "float32"


def test_counterfactuals_in_float64_under_64_true(tmp_path, checkpoint):
    results, objects = _counterfactuals(tmp_path, checkpoint, "trainer.precision=64-true", "counterfactual=svce")
    _finite(flatten(results["counterfactual"]["svce"]), "confidence_after", "l1_5")
    assert objects["counterfactuals"]["svce"].z.dtype == torch.float32  # the images' dtype


def test_counterfactual_command_device():
    from causal_ie.counterfactuals.command import _device

    assert _device(OmegaConf.create({"accelerator": "cpu", "devices": 1})) == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            _device(OmegaConf.create({"accelerator": "gpu", "devices": 1}))
    else:
        assert _device(OmegaConf.create({"accelerator": "gpu", "devices": [0]})) == torch.device("cuda", 0)


# ---------------------------------------------------------------- the autoencoder fitted in on_test_start


def _datamodule(**extra) -> SyntheticDataModule:
    synthetic = {"num_train": 32, "num_val": 16, "num_test": 16}
    return SyntheticDataModule(image_size=32, batch_size=8, augment=False, seed=0,
                                 synthetic=synthetic, **extra)


def _latent(steps: int = 4) -> LatentCE:
    return LatentCE(mode="channel", space="autoencoder", autoencoder={"steps": steps, "hidden": 8, "bottleneck": 4},
                    intervention=InterventionSpec(batch_size=16))


def _test(module: CEEvaluation, datamodule, **trainer) -> L.Trainer:
    t = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  inference_mode=False, **trainer)
    t.test(module, datamodule=datamodule)
    return t


def test_autoencoder_is_fitted_in_on_test_start_on_the_modules_device_and_dtype(tmp_path, monkeypatch):
    """64-true: Lightning makes the classifier float64 when the test starts; the autoencoder is
    trained then, inside the hook, in float64, with gradients although the test loop has none."""
    torch.manual_seed(0)
    classifier = Classifier(backbone="test_resnet", image_size=32).eval()
    calls = []
    train = autoencoder_module.train_autoencoder

    def recording(split, batches, settings=None, **kwargs):
        first = next(iter(split.parameters()))
        calls.append({"device": first.device, "dtype": first.dtype, "testing": module.trainer.testing,
                      "stage": module.trainer.state.stage.value, "grad_outside": torch.is_grad_enabled()})
        return train(split, batches, settings, **kwargs)

    monkeypatch.setattr(autoencoder_module, "train_autoencoder", recording)
    explainer = _latent()
    cache = AutoencoderCache(tmp_path / "cache", "key")
    module = CEEvaluation(classifier, {"ce_latent": explainer}, faithfulness=False, autoencoder_cache=cache)
    assert calls == [] and module.autoencoder_fits == {}  # nothing fitted before the test starts
    _test(module, _datamodule(), precision="64-true")
    assert len(calls) == 1
    call = calls[0]
    assert call["device"] == torch.device("cpu") and call["dtype"] == torch.float64
    assert call["testing"] and call["stage"] == "test" and not call["grad_outside"]
    fit = module.autoencoder_fits["ce_latent"]
    assert fit["space"] == "autoencoder" and 0 < fit["reconstruction_l1"] and 0 < fit["activation_l1"]
    files = list((tmp_path / "cache" / "autoencoders").glob("*.pt"))
    assert len(files) == 1
    state = torch.load(files[0], weights_only=True)
    assert state["encoder.0.weight"].dtype == torch.float64  # trained in the classifier's dtype
    assert math.isfinite(module.results["localisation"]["ce_latent"]["pointing_game"])
    # a second test run loads the cache instead of training
    module = CEEvaluation(classifier.float(), {"ce_latent": _latent()}, faithfulness=False, autoencoder_cache=cache)
    _test(module, _datamodule())
    assert len(calls) == 1  # loaded, now in float32
    assert module.autoencoder_fits["ce_latent"]["reconstruction_l1"] == pytest.approx(fit["reconstruction_l1"], rel=1e-6)


def test_autoencoder_needs_a_cache():
    classifier = Classifier(backbone="test_resnet", image_size=32).eval()
    with pytest.raises(ValueError, match="autoencoder_cache"):
        fit_autoencoders({"ce_latent": _latent()}, classifier, lambda: [], None)
    assert fit_autoencoders({"ce": PatchCE()}, classifier, lambda: [], None) == {}


class _Strategy:
    """What fit_autoencoders uses of a Lightning strategy, for one rank of a two-process run."""

    def __init__(self, rank: int, sent: dict | None = None):
        self.world_size, self.is_global_zero, self.sent, self.received = 2, rank == 0, sent, None

    def broadcast(self, obj, src=0):
        self.received = obj
        return obj if self.is_global_zero else self.sent


def test_under_ddp_rank_zero_fits_and_the_others_load_its_weights(tmp_path):
    torch.manual_seed(0)
    classifier = Classifier(backbone="test_resnet", image_size=32).eval()
    images = [torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    zero = _Strategy(0)
    fits = fit_autoencoders({"ce_latent": _latent()}, classifier, lambda: images, AutoencoderCache(tmp_path / "a", "k"), zero)
    sent = zero.received["ce_latent"]
    # another node (no shared file system): an empty cache, never trains, ends with rank 0's weights
    explainer = _latent()

    def no_training():
        raise AssertionError("rank 1 trained")

    other = fit_autoencoders({"ce_latent": explainer}, classifier, no_training, AutoencoderCache(tmp_path / "b", "k"),
                             _Strategy(1, sent=zero.received))
    assert other == fits
    x = images[0][:2]
    loaded = explainer.all_findings(classifier, x)
    path = cache_path(tmp_path / "b", "k", "backbone.layer2", explainer.autoencoder)
    assert path.is_file()
    assert all(torch.equal(v, sent[k]) for k, v in torch.load(path, weights_only=True).items())
    # the same file system: rank 0's file is read, not written again
    before = (tmp_path / "a" / "autoencoders").stat().st_mtime_ns, sorted((tmp_path / "a" / "autoencoders").iterdir())
    shared = _latent()
    fit_autoencoders({"ce_latent": shared}, classifier, no_training, AutoencoderCache(tmp_path / "a", "k"),
                     _Strategy(1, sent=zero.received))
    after = (tmp_path / "a" / "autoencoders").stat().st_mtime_ns, sorted((tmp_path / "a" / "autoencoders").iterdir())
    assert before == after
    torch.testing.assert_close(shared.all_findings(classifier, x), loaded, atol=0, rtol=0)


@pytest.mark.slow
def test_ddp_cpu_evaluation_with_the_autoencoder_equals_one_process(tmp_path, checkpoint):
    """Two gloo processes: rank 0 fits the autoencoder in on_test_start, rank 1 gets its weights."""
    args = [*TINY_EVAL, f"ckpt_path={checkpoint}", "data.test_subset=7", "cams=[]", "evaluation.faithfulness=false",
            "latent.space=autoencoder", "latent.mode=channel", "latent.autoencoder.steps=10"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CAUSAL_IE_ROOT": str(tmp_path)}
    out = {}
    for name, extra in (("one", []), ("two", ["trainer=ddp_cpu"])):
        run = subprocess.run(
            [sys.executable, str(ROOT / "evaluate.py"), *args, *extra, f"hydra.run.dir={tmp_path / name}",
             f"paths.cache_dir={tmp_path / name / 'cache'}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        out[name] = json.loads((tmp_path / name / "results.json").read_text())
        assert len(list((tmp_path / name / "cache" / "autoencoders").glob("*.pt"))) == 1
    # Lightning gives each of the two gloo processes half the threads, so rank 0 fits the autoencoder
    # with another OpenMP split than the single process: its float32 sums are reduced in another
    # order and its fit statistics differ in the last digits (seen: 0.05492595 vs 0.05492594, rel 7e-8).
    # rel 1e-5 leaves two orders of magnitude for 10 Adam steps to amplify that, while a rank fitting
    # on other images or its own shard would differ by percent.
    one_fit, two_fit = out["one"]["run"]["ce_latent"], out["two"]["run"]["ce_latent"]
    assert two_fit.keys() == one_fit.keys()
    for key, value in one_fit.items():
        expected = pytest.approx(value, rel=1e-5) if isinstance(value, float) else value
        assert two_fit[key] == expected, key
    for section in ("classification", "localisation"):
        assert flatten(out["two"][section]) == pytest.approx(flatten(out["one"][section]), abs=1e-5, nan_ok=True)


# ---------------------------------------------------------------- channels_last


def test_channels_last_is_opt_in_and_keeps_the_logits(tmp_path):
    torch.manual_seed(0)
    plain = Classifier(backbone="test_resnet", image_size=32).eval()
    fast = Classifier(backbone="test_resnet", image_size=32, channels_last=True).eval()
    fast.load_state_dict(plain.state_dict())
    def convs(model):  # 3x3 convs over several channels: there the two layouts differ
        return [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and min(m.weight.shape[1:]) > 1]

    assert convs(fast) and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs(fast))
    assert not any(w.is_contiguous(memory_format=torch.channels_last) for w in convs(plain))
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), atol=1e-5, rtol=0)
    assert compose_config("train", [], tmp_path).model.channels_last is False
    GlobalHydra.instance().clear()
    # saved with the checkpoint, so evaluate and the counterfactuals run the same layout
    trainer = L.Trainer(accelerator="cpu", logger=False, max_epochs=0, enable_progress_bar=False)
    trainer.strategy.connect(fast)
    trainer.save_checkpoint(tmp_path / "fast.ckpt")
    loaded = Classifier.load(tmp_path / "fast.ckpt")
    assert loaded.hparams.channels_last
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs(loaded))
