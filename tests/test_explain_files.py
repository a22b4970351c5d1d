"""`python -m causal_ie.explain input=...`: the strongest region of a map as a box in the
input file's pixels (hand-computed for a model that looks at one known region), the three
outputs on a folder of a PNG and a DICOM with torchxrayvision's 18 labels, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import compose_config
from dicom_fixtures import write_dicom
from hydra.core.global_hydra import GlobalHydra
from lightning.fabric.utilities.data import AttributeDict
from PIL import Image
from torch import nn

from causal_ie.data.errors import DataError
from causal_ie.explain.explainers import PatchCE
from causal_ie.explain.files import FileExplainer, explain_files, input_files, strongest_region, to_file_pixels
from causal_ie.interventions import InterventionSpec
from causal_ie.labels import LabelSpace

pytestmark = pytest.mark.usefixtures("one_thread")


def test_strongest_region_by_hand():
    effect = np.zeros((8, 8))
    effect[2:4, 5:8] = 1.0  # the peak region
    effect[6, 0] = 0.9  # strong, but not touching the peak
    effect[4, 7] = 0.4  # touching, below half the peak
    box, peak, mean = strongest_region(effect)
    assert box == (5, 2, 3, 2) and peak == 1.0 and mean == 1.0
    assert strongest_region(-np.ones((3, 3)))[0] == (0, 0, 1, 1)  # nothing positive: the peak pixel
    # a box in a 32 px map of a 48 x 64 (H x W) file
    assert to_file_pixels((4, 8, 8, 8), (32, 32), (48, 64)) == [8.0, 12.0, 16.0, 12.0]


class LooksAtOneRegion(nn.Module):
    """Label 0's logit is the sum of rows 8..15, columns 4..11 of a 32 px image; label 1 is constant."""

    def __init__(self):
        super().__init__()
        self.labels = LabelSpace(("Nodule", "Other"), "mine")
        self.findings = self.labels.names
        self.hparams = AttributeDict(backbone="region", image_size=32)
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        region = x[:, 0, 8:16, 4:12].sum((1, 2)) + self.bias
        return torch.stack([region - 64, torch.zeros_like(region) + self.bias], 1)


def test_the_box_is_in_the_input_files_pixels(tmp_path):
    Image.fromarray(np.full((48, 64), 255, np.uint8)).save(tmp_path / "white.png")  # H 48, W 64
    ce = PatchCE(size=1, stride=1, intervention=InterventionSpec(baseline="zero", outcome="logit"))
    explainer = FileExplainer(LooksAtOneRegion(), ce, None, image_size=32)
    results = explain_files(explainer, input_files(tmp_path), tmp_path / "out")
    (image,) = results["images"]
    assert (image["height"], image["width"]) == (48, 64)
    nodule = image["labels"]["Nodule"]
    # zeroing one pixel of the region lowers the logit by 1: region rows 8..15 (x1.5), columns 4..11 (x2)
    assert nodule["box"] == [8.0, 12.0, 16.0, 12.0]
    assert nodule["effect"] == pytest.approx(1.0) and nodule["box_mean_effect"] == pytest.approx(1.0)
    assert nodule["probability"] == pytest.approx(0.5)  # 64 white pixels - 64: logit 0
    maps = np.load(tmp_path / "out" / "maps.npz")
    assert list(maps["labels"]) == ["Nodule", "Other"] and maps["white"].shape == (2, 32, 32)
    assert maps["white"][0, 8:16, 4:12].min() == pytest.approx(1.0) and maps["white"][1].max() == 0


def _run(tmp_path, *overrides):
    from causal_ie.explain.task import run_explain

    cfg = compose_config("explain", ["model=xrv", "model.weights=random", "model.input_resolution=32", "mask.size=8",
                                     "mask.stride=8", *overrides], tmp_path / "run")
    try:
        return run_explain(cfg)[0]
    finally:
        GlobalHydra.instance().clear()


def test_a_folder_of_a_png_and_a_dicom_gets_all_three_outputs_with_the_18_labels(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 56), dtype=np.uint8)).save(folder / "a.png")
    write_dicom(folder / "b.dcm", rng.integers(0, 4096, (60, 44)), "MONOCHROME1", slope=1, intercept=0)
    results = _run(tmp_path, f"input={folder}")
    run = tmp_path / "run"
    saved = json.loads((run / "explanations.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert [i["key"] for i in saved["images"]] == ["a", "b"] and saved["run"]["explained"] == 2
    assert len(saved["run"]["labels"]) == 18 and {"Lung Opacity", "Fracture"} <= set(saved["run"]["labels"])
    for image, (h, w) in zip(saved["images"], [(40, 56), (60, 44)]):
        assert (image["height"], image["width"]) == (h, w) and len(image["labels"]) == 18
        for entry in image["labels"].values():
            x, y, bw, bh = entry["box"]
            assert 0 <= x and x + bw <= w + 1e-9 and 0 <= y and y + bh <= h + 1e-9
            assert 0 <= entry["probability"] <= 1
        assert (run / image["figure"]).stat().st_size > 5000
    maps = np.load(run / "maps.npz")
    assert maps["a"].shape == maps["b"].shape == (18, 32, 32) and len(maps["labels"]) == 18


def test_bad_input_is_named(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"input='.*images' is an empty folder"):
        input_files(folder)
    with pytest.raises(FileNotFoundError, match=r"input='.*nope' does not exist"):
        input_files(tmp_path / "nope")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(folder / "good.png")
    (folder / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00" * 20)
    with pytest.raises(DataError, match=r"broken\.dcm"):
        _run(tmp_path, f"input={folder}", "cams=[]")
    results = _run(tmp_path, f"input={folder}", "cams=[]", "on_error=skip")
    assert results["run"]["explained"] == 1 and [s["file"] for s in results["skipped"]] == [str(folder / "broken.dcm")]
    assert "broken.dcm" in results["skipped"][0]["reason"]
