"""A partial ChestX-ray14 download (only images_001 unpacked) through the datamodule and both scripts.

The folder of :func:`make_partial_nih_root` has the real CSV headers, 1024 px
PNGs (one RGBA, one 16-bit), two 512 px PNGs, a truncated file, an unknown
label and listed images missing from disk; every count and box below is
worked out by hand from that layout.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from nih_fixtures import V2020_NAME, expected_pixels, make_partial_nih_root

from causal_ie.data import DataError
from causal_ie.data.findings import FINDINGS
from causal_ie.data.images import resize_uint8
from causal_ie.data.sources import NIHDataModule
from conftest import compose_config

pytestmark = pytest.mark.usefixtures("one_thread")

# Box file lines in pixels of each PNG -> expected at image_size 64 (scale 64/1024 or 64/512),
# whatever OriginalImage[Width,Height] (2,500 x 2,048 and up) says.
EXPECTED_BOXES_64 = {
    ("00000001_000.png", "Infiltration"): [32.0, 16.0, 8.0, 4.0],  # 1024 px: 512, 256, 128, 64
    ("00000001_001.png", "Mass"): [6.25, 12.5, 18.75, 25.0],  # RGBA 1024 px: 100, 200, 300, 400
    ("00000001_001.png", "Effusion"): [37.5, 31.25, 12.5, 9.375],  # 600, 500, 200, 150
    ("00000005_000.png", "Atelectasis"): [1.3125, 2.53125, 37.5, 25.09375],  # 512 px: 10.5, 20.25, 300, 200.75
}
MISSING = ["00000002_001.png", "00000004_000.png", "00000004_001.png", "00000005_001.png", "00000008_001.png"]
TRAIN_VAL_READABLE = {
    "00000002_000.png", "00000003_000.png", "00000003_001.png", "00000006_001.png", "00000007_000.png", "00000007_001.png"
}


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
    return make_partial_nih_root(tmp_path_factory.mktemp("partial"))


def datamodule(root, cache, **kwargs) -> NIHDataModule:
    settings = dict(root=str(root), image_size=64, batch_size=4, cache_dir=str(cache), augment=False,
                    on_error="skip", val_fraction=0.25)
    return NIHDataModule(**(settings | kwargs))


def test_partial_download_splits_counts_pixels_and_boxes(partial, tmp_path, caplog):
    root, written = partial
    dm = datamodule(root, tmp_path / "cache")
    with caplog.at_level(logging.WARNING):
        dm.prepare_data()  # as Lightning calls it: prepare_data, then setup per stage, again on test
        dm.setup("fit")
        dm.setup("test")
        dm.prepare_data()
    summaries = [r for r in caplog.records if "skipped" in r.getMessage() and "problem file" in r.getMessage()]
    assert len(summaries) == 1, [r.getMessage() for r in summaries]  # once, not once per split or call
    assert "7 problem file(s)" in summaries[0].getMessage()

    train, val, test = (dm.dataset(s) for s in ("train", "val", "test"))
    assert test.ids == ["00000001_000.png", "00000001_001.png", "00000005_000.png"]  # test_list.txt, present, readable
    assert set(train.ids) | set(val.ids) == TRAIN_VAL_READABLE and not set(train.ids) & set(val.ids)
    assert len(val) >= 1 and not set(train.patient_ids) & set(val.patient_ids)  # validation patient-wise from train

    by_name = {w.record.name: w for w in written}
    for ds in (train, val, test):
        for i, name in enumerate(ds.ids):
            w = by_name[name]
            expected = resize_uint8(expected_pixels(w.record.index, w.png_size), 64).astype(np.float32) / 255
            np.testing.assert_allclose(ds[i]["image"][0].numpy(), expected, atol=1e-7)  # gray, RGBA and 16-bit alike
            assert w.original[0] >= 2500 and w.original[0] != w.png_size

    served = {}
    for batch in dm.test_dataloader():
        for name, boxes in zip(batch["id"], batch["boxes"], strict=True):
            for k, finding in enumerate(FINDINGS):
                if not torch.isnan(boxes[k]).any():
                    served[name, finding] = boxes[k].tolist()
    assert served.keys() == EXPECTED_BOXES_64.keys()
    for key, box in EXPECTED_BOXES_64.items():
        np.testing.assert_allclose(served[key], box, rtol=1e-6, err_msg=str(key))


def test_data_report_counts_reasons_and_names(partial, tmp_path):
    root, _ = partial
    dm = datamodule(root, tmp_path / "cache")
    report = dm.data_report()
    assert json.loads(json.dumps(report)) == report  # plain JSON types only
    assert report["source"] == "nih" and report["on_error"] == "skip" and report["split"] == "official lists"
    assert report["metadata_file"] == V2020_NAME and report["image_folders"] == ["images_001/images"]
    assert (report["images_listed"], report["images_found"], report["images_readable"], report["images_used"]) == (16, 10, 9, 9)
    assert report["images_skipped"] == 7
    assert report["skipped"] == {"unknown label": 1, "missing image": 5, "unreadable image": 1}
    assert report["skipped_examples"]["missing image"] == MISSING
    assert report["skipped_examples"]["unreadable image"][0].endswith("images_001/images/00000006_000.png")
    assert "00000008_000.png" in report["skipped_examples"]["unknown label"][0]
    assert report["splits"]["test"] == {"images": 3, "patients": 2, "with_boxes": 3}
    assert report["splits"]["train"]["images"] + report["splits"]["val"]["images"] == 6
    assert report["splits"]["train"]["with_boxes"] == 0


def test_evaluate_settings_box_test_subset_and_workers(partial, tmp_path):
    """conf/evaluate.yaml's data.test_boxes_only=true and data.test_subset on a partial folder,
    served through DataLoader worker processes."""
    root, _ = partial
    dm = datamodule(root, tmp_path / "cache", test_boxes_only=True, test_subset=2, num_workers=2)
    dm.prepare_data()
    dm.setup("test")
    assert len(dm.dataset("test")) == 2
    report = dm.data_report()
    assert report["boxes_only"] == ["test"]
    assert report["splits"]["test"] == {"images": 2, "patients": 1, "with_boxes": 2, "images_before_subset": 3}
    ids = [i for batch in dm.test_dataloader() for i in batch["id"]]
    assert ids == ["00000001_000.png", "00000001_001.png"]
    dm.setup("fit")
    dm.augmentation = None
    assert sum(len(b["id"]) for b in dm.train_dataloader()) == len(dm.dataset("train"))


def test_default_on_error_raises_naming_file_and_setting(partial, tmp_path):
    root, _ = partial
    with pytest.raises(DataError, match=r"unknown label: .*line 16 \(image 00000008_000\.png\).*'Tumour'.*data\.on_error=skip"):
        datamodule(root, tmp_path / "cache", on_error="raise").setup("test")


def test_no_image_found_at_all_names_the_folders_searched(partial, tmp_path):
    root, _ = partial
    empty = tmp_path / "nih_empty"
    (empty / "images_001" / "images").mkdir(parents=True)
    (empty / "images_002" / "images").mkdir(parents=True)
    (empty / "images_002" / "images" / "unrelated.png").write_bytes(b"")
    for name in (V2020_NAME, "BBox_List_2017.csv", "train_val_list.txt", "test_list.txt"):
        (empty / name).write_bytes((root / name).read_bytes())
    with pytest.raises(DataError) as err:
        datamodule(empty, tmp_path / "cache").setup("fit")  # on_error=skip: still an error
    msg = str(err.value)
    assert "none of the 15 listed images" in msg and "00000001_000.png" in msg
    assert str(empty / "images_001" / "images") in msg and str(empty / "images_002" / "images") in msg
    (empty / "images_001" / "images").rmdir()
    for path in (empty / "images_002" / "images" / "unrelated.png", empty / "images_002" / "images"):
        path.unlink() if path.is_file() else path.rmdir()
    with pytest.raises(DataError, match=r"no image folder in .*nih_empty.*images_001"):
        datamodule(empty, tmp_path / "cache").setup("fit")


def test_empty_box_test_split_says_why(partial, tmp_path):
    root, _ = partial
    bare = tmp_path / "nih_no_test_boxes"
    (bare / "images").mkdir(parents=True)
    for name in (V2020_NAME, "BBox_List_2017.csv", "train_val_list.txt", "test_list.txt"):
        (bare / name).write_bytes((root / name).read_bytes())
    for name in TRAIN_VAL_READABLE:  # no test image on disk
        (bare / "images" / name).write_bytes((root / "images_001" / "images" / name).read_bytes())
    dm = datamodule(bare, tmp_path / "cache", test_boxes_only=True)
    with pytest.raises(DataError, match=r"test split .* is empty .*16 images listed.*6 used.*data\.test_boxes_only"):
        dm.setup("test")


@pytest.mark.slow
def test_train_and_evaluate_scripts_on_a_partial_download(partial, tmp_path):
    """`python train.py data=nih data.root=DIR data.on_error=skip`, then evaluate.py likewise."""
    from causal_ie.evaluation import evaluate
    from causal_ie.training import train

    root, _ = partial
    data = [
        "data=nih",
        f"data.root={root}",
        "data.on_error=skip",
        "data.image_size=32",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.pin_memory=false",
        "data.val_fraction=0.25",
        f"data.cache_dir={tmp_path / 'cache'}",
        "logger=none",
        "+trainer.enable_progress_bar=false",
    ]
    short = ["model=tiny", "trainer.max_epochs=1", "~callbacks.model_summary", "~callbacks.progress_bar"]
    cfg = compose_config("train", [*data, *short], tmp_path / "train")
    _, objects = train(cfg)
    GlobalHydra.instance().clear()
    ckpt = objects["trainer"].checkpoint_callback.best_model_path
    assert ckpt and objects["datamodule"].data_report()["images_used"] == 9

    cfg = compose_config(
        "evaluate", [*data, f"ckpt_path={ckpt}", "cams=[gradcam]", "evaluation.deletion_steps=4", "intervention.batch_size=16"], tmp_path / "eval"
    )
    assert cfg.data.test_boxes_only is True and cfg.data.test_subset == 96  # conf/evaluate.yaml as shipped
    results, objects = evaluate(cfg)
    GlobalHydra.instance().clear()
    report = objects["datamodule"].data_report()
    assert report["splits"]["test"] == {"images": 3, "patients": 2, "with_boxes": 3}
    assert report["skipped"] == {"unknown label": 1, "missing image": 5, "unreadable image": 1}
    assert np.isfinite(results["localisation"]["ce"]["pointing_game"])
    assert (tmp_path / "eval" / "results.json").is_file() and (tmp_path / "eval" / "report.md").is_file()
