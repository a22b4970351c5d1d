"""A pretrained torchxrayvision model scored, explained and attacked on each DICOM data source's
own ground truth without training (evaluate.py model=xrv attack=fgsm data=vindr|rsna|siim):
its labels aligned to the source's by name, localisation on the source's masks."""

from __future__ import annotations

import math

import pytest
from conftest import compose_config
from hydra.core.global_hydra import GlobalHydra

pytest.importorskip("torchxrayvision")
pytest.importorskip("pydicom")

pytestmark = pytest.mark.usefixtures("one_thread")



def source_root(source, tmp_path):
    if source == "vindr":
        from vindr_fixtures import make_vindr_root, pick_images, shipped_rows

        rows = shipped_rows()
        return make_vindr_root(tmp_path, pick_images(rows, 8, 0), rows=rows)
    if source == "rsna":
        from rsna_fixtures import make_rsna_root, pick_images, shipped_rows

        rows = shipped_rows()
        return make_rsna_root(tmp_path, pick_images(rows, [1, 2, 3, 1, 2, 4, 2, 1], 0), rows=rows)
    from siim_fixtures import make_siim_root, pick_images, shipped_rows

    rows = shipped_rows()
    return make_siim_root(tmp_path, pick_images(rows, [1, 2, 3, 4, 1, 2], 4), rows=rows)


@pytest.mark.parametrize("source", ["vindr", "rsna", "siim"])
def test_xrv_model_is_scored_explained_and_attacked_on_the_sources_ground_truth(source, tmp_path):
    from causal_ie.evaluation import evaluate
    from causal_ie.outputs.schema import EVALUATION, problems

    root = source_root(source, tmp_path)
    cfg = compose_config("evaluate", [
        f"data={source}", f"data.root={root}", "data.image_size=32", "data.batch_size=4", "data.num_workers=0",
        "data.pin_memory=false", f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.25",
        "data.test_fraction=0.5", "logger=none", "model=xrv", "model.weights=random", "model.input_resolution=32",
        "cams=[gradcam]", "latent=null", "evaluation.deletion_steps=2", "attack=fgsm", "attack.eps=0.05",
        "detection.pairs=all", "detection.repeats=1", "mask.size=8", "mask.stride=8",
        f"paths.checkpoint_search=[{tmp_path / 'none'}]", "~callbacks.progress_bar", "+trainer.enable_progress_bar=false",
    ], tmp_path / "eval")
    try:
        results, objects = evaluate(cfg)
    finally:
        GlobalHydra.instance().clear()
    assert problems(results, EVALUATION) == []
    labels = results["run"]["labels"]
    dm = objects["datamodule"]
    assert labels["data"] == source and labels["model"] == "xrv:random-densenet121"
    assert labels["scored"] and all(dm.labels.find(n) is not None or n in ("Nodule", "Mass") for n in labels["scored"])
    # the localisation pairs: a scored label present on a test image with a non-empty mask
    test = dm.dataset("test")
    items = [test[i] for i in range(len(test))]
    expected = sum(int(((it["labels"] > 0.5) & it["masks"].flatten(1).any(1)).sum()) for it in items)
    assert results["localisation_pairs"] == expected > 0
    assert math.isfinite(results["localisation"]["ce"]["pointing_game"])
    assert results["attack"]["num_images"] == len(items) and "ce" in results["detection"]
