"""torchxrayvision classifiers behind the project's contract: one column per named output in the
network's own label space (18 for the all-data sets DenseNet), [-1024, 1024] scaling, resize, input gradients, weights files and the errors when there are none."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_EVAL, compose_config
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from torch.nn import functional as F

from causal_ie.data.findings import FINDINGS
from causal_ie.models import XRVClassifier
from causal_ie.models.xrv import build_network, cache_path, xrv_weight_names

pytestmark = pytest.mark.usefixtures("one_thread")

xrv = pytest.importorskip("torchxrayvision")
URLS = xrv.models.model_urls
CHEX_MISSING = ("Infiltration", "Mass", "Nodule", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
# how many named outputs each pretrained weights name has (torchxrayvision 1.5.7's label lists,
# counted by hand: the 18-slot lists hold '' where a data set has no such label)
NAMED_OUTPUTS = {
    "densenet121-res224-all": 18,
    "densenet121-res224-nih": 14,
    "densenet121-res224-pc": 15,  # PadChest adds Fracture
    "densenet121-res224-chex": 11,
    "densenet121-res224-mimic_nb": 11,
    "densenet121-res224-mimic_ch": 11,
    "densenet121-res224-rsna": 2,
    "resnet50-res512-all": 18,
}
SMALL = 32  # network input side in the tests (the real weights use 224 / 512)


def head(net: torch.nn.Module) -> torch.nn.Linear:
    return net.classifier if hasattr(net, "classifier") else net.fc


def indexed_state(arch: str, n: int = 18) -> dict[str, torch.Tensor]:
    """A random network whose output i is the constant logit i (zero head weights, bias = i)."""
    torch.manual_seed(0)
    net = build_network(arch, n)
    with torch.no_grad():
        head(net).weight.zero_()
        head(net).bias.copy_(torch.arange(n, dtype=torch.float32))
    return net.state_dict()


def fill_cache(cache_dir, weights: str, state: dict[str, torch.Tensor]) -> None:
    path = cache_path(weights, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


@pytest.fixture
def no_download(monkeypatch):
    """Any download attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("torchxrayvision tried to download")

    monkeypatch.setattr(xrv.utils, "download", refuse)


def test_known_weights_names_are_the_ones_tested():
    assert set(xrv_weight_names()) == set(NAMED_OUTPUTS)


@pytest.mark.parametrize("weights", sorted(NAMED_OUTPUTS))
def test_each_named_output_is_a_column_with_its_own_logit(weights, tmp_path, no_download):
    arch = "resnet50" if weights.startswith("resnet50") else "densenet121"
    fill_cache(tmp_path, weights, indexed_state(arch))
    model = XRVClassifier(weights=weights, cache_dir=tmp_path, input_resolution=SMALL)
    labels = URLS[weights]["labels"]
    out = model(torch.rand(2, 1, SMALL, SMALL))
    assert out.shape == (2, NAMED_OUTPUTS[weights]) and torch.isfinite(out).all()
    # network output i has the constant logit i: column j is the j-th named output
    named = [i for i, p in enumerate(labels) if p]
    torch.testing.assert_close(out, torch.tensor(named, dtype=torch.float32).expand(2, -1))
    assert model.findings == tuple(labels[i] for i in named) == model.labels.names
    assert model.labels.name == f"xrv:{weights}" and model.missing_findings == ()
    assert model.weights_file == cache_path(weights, tmp_path)
    assert model.hparams.backbone == f"xrv:{weights}"
    assert model.input_resolution == SMALL


def test_effusion_logit_lands_in_the_effusion_column():
    model = XRVClassifier("random", input_resolution=SMALL)
    k = model.pathologies.index("Effusion")
    with torch.no_grad():
        head(model.backbone).bias.zero_()
        head(model.backbone).bias[k] = 7.5
        head(model.backbone).weight.zero_()
    out = model(torch.rand(3, 1, SMALL, SMALL))
    assert len(model.findings) == 18 and {"Lung Opacity", "Fracture", "Lung Lesion"} <= set(model.findings)
    j = model.findings.index("Effusion")
    assert (out[:, j] == 7.5).all()
    assert (out[:, [i for i in range(18) if i != j]] == 0).all()


def test_chex_pathologies_keep_only_the_named_outputs_and_the_checkpoint_records_them():
    chex = URLS["densenet121-res224-chex"]["labels"]
    model = XRVClassifier("random", pathologies=chex, input_resolution=SMALL)
    out = model(torch.rand(2, 1, SMALL, SMALL))
    assert out.shape == (2, 11) and torch.isfinite(out).all()
    assert not set(CHEX_MISSING) & set(model.findings)
    assert model.hparams.labels["names"] == [p for p in chex if p]
    assert model.hparams.pathologies == list(chex)


def test_forward_returns_logits_not_the_op_norm_probabilities(tmp_path):
    # a head bias of 30: a logit, far outside what op_norm's calibrated probabilities can be
    weights = "densenet121-res224-nih"
    state = indexed_state("densenet121")
    state["classifier.bias"] = torch.full((18,), 30.0)
    fill_cache(tmp_path, weights, state)
    model = XRVClassifier(weights, cache_dir=tmp_path, input_resolution=SMALL)
    x = torch.rand(2, 1, SMALL, SMALL)
    assert (model(x) == 30).all()
    # torchxrayvision's own forward with op_threshs is op_norm(sigmoid(these logits))
    net = model.backbone
    prepared = model.network_input(x)
    raw = net.forward(prepared)  # no op_threshs set on the wrapped network: raw outputs
    torch.testing.assert_close(model.network_logits(prepared), raw)
    thresholds = torch.tensor(URLS[weights]["op_threshs"], dtype=torch.float32)
    net.op_threshs = thresholds
    try:
        calibrated = net.forward(prepared)
    finally:
        net.op_threshs = None
    torch.testing.assert_close(calibrated, xrv.models.op_norm(torch.sigmoid(raw), thresholds))
    assert calibrated.max() <= 1
    # the operating points, one per output column
    thresholds = URLS[weights]["op_threshs"]
    labels = URLS[weights]["labels"]
    torch.testing.assert_close(
        model.operating_points, torch.tensor([thresholds[labels.index(f)] for f in model.findings], dtype=torch.float32)
    )


def test_logits_match_torchxrayvision_forward_on_a_real_image_pipeline():
    # forward == xrv's DenseNet forward (no op_threshs) on xrv-normalised, resized input
    model = XRVClassifier("random", input_resolution=SMALL)
    x = torch.rand(2, 1, 16, 16)
    scaled = xrv.datasets.normalize(x.numpy(), 1.0)  # [0, 1] -> [-1024, 1024] as xrv does
    resized = F.interpolate(torch.from_numpy(scaled), size=(SMALL, SMALL), mode="bilinear", antialias=True)
    reference = model.backbone.forward(resized)
    torch.testing.assert_close(model(x), reference, rtol=1e-4, atol=1e-4)


def test_normalisation_maps_0_and_1_to_the_xrv_range():
    model = XRVClassifier("random", input_resolution=SMALL)
    seen = []
    hook = model.backbone.features.conv0.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    try:
        x = torch.zeros(2, 1, SMALL, SMALL)
        x[1] = 1.0
        model(x)
    finally:
        hook.remove()
    (net_in,) = seen
    assert net_in.shape == (2, 1, SMALL, SMALL)
    assert (net_in[0] == -1024).all() and (net_in[1] == 1024).all()


@pytest.mark.parametrize("arch", ["densenet121", "resnet50"])
def test_any_input_size_is_resized_to_the_network_resolution(arch):
    model = XRVClassifier("random", arch=arch, input_resolution=SMALL)
    first = model.backbone.features.conv0 if arch == "densenet121" else model.backbone.conv1
    seen = []
    hook = first.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    try:
        for side in (16, 48):
            x = torch.rand(2, 1, side, side)
            assert model(x).shape == (2, 18)
            expected = F.interpolate(x, size=(SMALL, SMALL), mode="bilinear", antialias=True) * 2048 - 1024
            torch.testing.assert_close(seen[-1], expected)
    finally:
        hook.remove()
    assert model.hparams.image_size is None and model.hparams.get("image_size") is None


def test_the_default_resolution_is_the_weights_own(tmp_path):
    fill_cache(tmp_path, "resnet50-res512-all", indexed_state("resnet50"))
    assert XRVClassifier("resnet50-res512-all", cache_dir=tmp_path).input_resolution == 512
    assert XRVClassifier("random").input_resolution == 224


def test_gradients_reach_the_input_and_the_weights_are_frozen():
    model = XRVClassifier("random", input_resolution=SMALL)
    assert not model.training and not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    x = torch.rand(2, 1, 24, 24, requires_grad=True)
    model(x)[:, model.findings.index("Effusion")].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_unnamed_outputs_pass_no_gradient_into_the_kept_columns():
    model = XRVClassifier("random", pathologies=URLS["densenet121-res224-chex"]["labels"], input_resolution=SMALL)
    x = torch.rand(2, 1, SMALL, SMALL, requires_grad=True)
    out = model(x)
    out[:, model.findings.index("Effusion")].sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["state_dict", "wrapper_state_dict", "whole_module"])
def test_a_weights_file_given_as_checkpoint_loads(kind, tmp_path, no_download, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # an empty default cache
    torch.manual_seed(1)
    source = XRVClassifier("random", input_resolution=SMALL)
    path = tmp_path / "weights.pt"
    if kind == "state_dict":
        torch.save(source.backbone.state_dict(), path)
    elif kind == "wrapper_state_dict":
        torch.save(source.state_dict(), path)
    else:  # torchxrayvision's DenseNet release files are pickled whole modules
        torch.save(source.backbone, path)
    loaded = XRVClassifier("densenet121-res224-nih", checkpoint=str(path), input_resolution=SMALL)
    x = torch.rand(2, 1, SMALL, SMALL)
    # the NIH weights name 14 of the 18 outputs: the same network, its named columns
    torch.testing.assert_close(loaded(x), source(x)[:, :14])
    assert loaded.findings == source.findings[:14]
    assert loaded.weights_file == path and loaded.hparams.checkpoint == str(path)
    # weights=random takes a checkpoint too (the architecture from model.arch)
    again = XRVClassifier("random", checkpoint=path, input_resolution=SMALL)
    torch.testing.assert_close(again(x), source(x))


def test_without_cache_or_checkpoint_the_error_names_both(tmp_path, monkeypatch, no_download):
    monkeypatch.setenv("HOME", str(tmp_path))
    expected = tmp_path / ".torchxrayvision" / "models_data" / URLS["nih"]["weights_url"].rsplit("/", 1)[1]
    with pytest.raises(FileNotFoundError) as err:
        XRVClassifier("densenet121-res224-nih")
    message = str(err.value)
    assert str(expected) in message and "model.checkpoint=" in message and "model.weights=densenet121-res224-nih" in message
    assert not (tmp_path / ".torchxrayvision").exists()  # nothing created, nothing downloaded
    # an explicit cache_dir is the one named
    with pytest.raises(FileNotFoundError, match="model.checkpoint=") as err:
        XRVClassifier("resnet50-res512-all", cache_dir=tmp_path / "cache")
    assert str(tmp_path / "cache") in str(err.value)


def test_missing_checkpoint_file_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model.checkpoint='.*nope.pt' does not exist"):
        XRVClassifier("densenet121-res224-nih", checkpoint=tmp_path / "nope.pt")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("text", "cannot be read as a torch file"),
        ("empty", "is an empty file"),
        ("list", "holds a list, not a state dict"),
        ("resnet", "does not fit torchxrayvision's densenet121 with 18 outputs"),
    ],
)
def test_bad_weights_files_name_the_file_and_the_key(content, message, tmp_path):
    path = tmp_path / "bad.pt"
    if content == "text":
        path.write_text("these are my notes\n")
    elif content == "empty":
        path.touch()
    elif content == "list":
        torch.save([1, 2, 3], path)
    else:
        torch.save(build_network("resnet50", 18).state_dict(), path)
    with pytest.raises(ValueError, match=message) as err:
        XRVClassifier("densenet121-res224-nih", checkpoint=path)
    assert f"model.checkpoint={str(path)!r}" in str(err.value)


def test_an_empty_cached_file_names_the_cache(tmp_path):
    path = cache_path("densenet121-res224-chex", tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    with pytest.raises(ValueError, match="torchxrayvision's cached file .* is an empty file"):
        XRVClassifier("densenet121-res224-chex", cache_dir=tmp_path)


def test_weights_names_and_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"model.weights='densenet121-nih' is not a torchxrayvision weights name.*densenet121-res224-nih"):
        XRVClassifier("densenet121-nih")
    with pytest.raises(ValueError, match="model.input_resolution must be a whole number of pixels >= 1 or null, got 0"):
        XRVClassifier("random", input_resolution=0)
    with pytest.raises(ValueError, match="model.arch='vgg16'"):
        XRVClassifier("random", arch="vgg16")
    with pytest.raises(ValueError, match="model.pathologies"):
        XRVClassifier("densenet121-res224-nih", pathologies=["Effusion"], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="does not match model.weights"):
        XRVClassifier("densenet121-res224-nih", arch="resnet50", cache_dir=tmp_path)
    # torchxrayvision's short aliases name the same weights
    fill_cache(tmp_path, "densenet121-res224-nih", indexed_state("densenet121"))
    model = XRVClassifier("nih", cache_dir=tmp_path, input_resolution=SMALL)
    assert model.weights == "densenet121-res224-nih" and model.hparams.backbone == "xrv:densenet121-res224-nih"


def test_importing_torchxrayvision_keeps_the_warning_filters():
    import warnings

    XRVClassifier("random", input_resolution=SMALL)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        warnings.warn("still visible", UserWarning)
    assert caught  # torchxrayvision's module-level filterwarnings("ignore") did not leak
    assert not any(f[0] == "ignore" and f[1] is None and f[2] is Warning for f in warnings.filters)


def _compose_model(tmp_path, *overrides: str):
    """conf/model/xrv.yaml composed into the evaluate config."""
    cfg = compose_config("evaluate", ["model=xrv", *overrides], tmp_path)
    GlobalHydra.instance().clear()
    return cfg


def test_hydra_config_composes_and_instantiates(tmp_path):
    cfg = _compose_model(tmp_path, "model.weights=random", f"model.input_resolution={SMALL}", "data.image_size=32")
    assert cfg.model._target_ == "causal_ie.models.xrv.XRVClassifier"
    assert set(cfg.model) == {"_target_", "weights", "checkpoint", "cache_dir", "arch", "pathologies", "input_resolution"}
    model = instantiate(cfg.model, _convert_="all")
    assert isinstance(model, XRVClassifier)
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 18)
    assert model.hparams.backbone == "xrv:random-densenet121"
    # the shipped default is the all-datasets DenseNet, read from the cache
    default = _compose_model(tmp_path)
    assert default.model.weights == "densenet121-res224-all" and default.model.checkpoint is None


def test_hydra_config_missing_weights_error(tmp_path, monkeypatch, no_download):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = _compose_model(tmp_path, "model.weights=densenet121-res224-nih")
    with pytest.raises(Exception, match="model.checkpoint=") as err:
        instantiate(cfg.model, _convert_="all")
    assert ".torchxrayvision" in str(err.value)


# ---------------------------------------------------------------- the project's tools on it


def test_ce_cams_latent_and_attacks_run_on_it():
    from causal_ie.attacks import MultiLabelAttack
    from causal_ie.explain.cam import CAMExplainer, resolve_target_layer
    from causal_ie.interventions import causal_effect
    from causal_ie.interventions.latent import latent_split

    chex = URLS["densenet121-res224-chex"]["labels"]
    model = XRVClassifier("random", pathologies=chex, input_resolution=SMALL)
    x = torch.rand(2, 1, SMALL, SMALL)
    k = len(model.findings)

    maps = causal_effect(model, x, window=8, stride=8)
    assert maps.shape == (2, k, SMALL, SMALL) and k == 11
    assert torch.isfinite(maps).all()

    assert resolve_target_layer(model)[0] == "backbone.features.norm5"
    cam = CAMExplainer("gradcam")(model, x, torch.tensor([0, 1]), torch.tensor([model.findings.index("Effusion")] * 2))
    assert cam.shape == (2, SMALL, SMALL) and torch.isfinite(cam).all()

    split = latent_split(model)
    assert split.layer == "backbone.features.transition1"
    torch.testing.assert_close(split(x), model(x))

    labels = torch.zeros(2, k)
    out = MultiLabelAttack("pgd", eps=0.05, alpha=None, steps=2)(model, x, labels)
    assert out.attacked.sum(1).eq(1).all()
    assert (out.images - x).abs().max() <= 0.05 + 1e-6


# ---------------------------------------------------------------- end to end, random weights


CHEX_LIKE = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Pneumonia", "Pneumothorax",
             "Lung Lesion", "Fracture"]  # lacks Infiltration, Mass, Nodule, Emphysema, Fibrosis, ...


def test_evaluate_explains_and_attacks_a_pretrained_model_without_training(tmp_path):
    from causal_ie.evaluation import evaluate
    from causal_ie.outputs.schema import EVALUATION, problems

    cfg = compose_config(
        "evaluate",
        [*TINY_EVAL, "model=xrv", "model.weights=random", f"model.input_resolution={SMALL}",
         f"model.pathologies=[{','.join(repr(p) for p in CHEX_LIKE)}]", "data.test_subset=6",
         "evaluation.deletion_steps=2", "attack=fgsm", "attack.eps=0.05", "detection.pairs=all",
         "detection.repeats=1", "mask.size=8", "mask.stride=8", f"paths.checkpoint_search=[{tmp_path / 'none'}]"],
        tmp_path,
    )
    try:
        results, objects = evaluate(cfg)
    finally:
        GlobalHydra.instance().clear()
    assert problems(results, EVALUATION) == []
    run = results["run"]
    assert run["backbone"] == "xrv:random-densenet121" and run["checkpoint"] == "none"
    # the model's 9 labels: 7 aligned by name with NIH's 14, Lung Lesion and Fracture its own
    assert run["labels"] == {
        "model": "xrv:random-densenet121", "data": "nih14", "scored": CHEX_LIKE[:7], "model_only": ["Lung Lesion", "Fracture"],
        "data_only": [f for f in FINDINGS if f not in CHEX_LIKE],
    }
    assert run["missing_findings"] == []
    # scored: the shared labels; the model's own are explained and attacked, never scored
    auroc = results["classification"]["auroc"]
    assert [f for f in auroc if not f.endswith(("_ci_low", "_ci_high"))] == CHEX_LIKE
    assert all(math.isnan(auroc[f]) for f in CHEX_LIKE[7:]) and not any(math.isnan(auroc[f]) for f in CHEX_LIKE[:7])
    assert results["classification"]["auroc_mean"] == pytest.approx(sum(auroc[f] for f in CHEX_LIKE[:7]) / 7)
    assert all(math.isnan(results["attack"]["auroc"][f]) for f in CHEX_LIKE[7:])
    # the served test split holds the labels in the model's order, NaN for its own labels
    test = objects["datamodule"].dataset("test")
    present = [test[i] for i in range(len(test))]
    assert all(it["labels"].shape == (9,) and it["labels"][7:].isnan().all() for it in present)
    raw = objects["datamodule"]._dataset("test")
    nih = [FINDINGS.index(f) for f in CHEX_LIKE[:7]]
    pairs = sum(
        int(((raw[i]["labels"] > 0.5) & ~raw[i]["boxes"].isnan().any(-1))[nih].sum()) for i in range(len(raw))
    )
    assert results["localisation_pairs"] == pairs
    for name in ("ce", "max_prob", "noise_flip"):
        assert not math.isnan(results["detection"][name]["auroc"]), name
    assert (tmp_path / "report.md").is_file()
