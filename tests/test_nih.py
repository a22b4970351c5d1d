"""ChestX-ray14 reading against miniature folders in the real NIH file formats."""

from __future__ import annotations

import logging
import pickle
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from nih_fixtures import OLD_NAME, V2020_NAME, expected_pixels, make_nih_root, nih_records
from PIL import Image

from causal_ie.data import nih
from causal_ie.data.errors import DataError, ProblemLog
from causal_ie.data.findings import FINDINGS
from causal_ie.data.images import load_grayscale, resize_uint8
from causal_ie.data.splits import patient_split


def _label_matrix(records) -> np.ndarray:
    out = np.zeros((len(records), len(FINDINGS)), dtype=np.int64)
    for i, r in enumerate(records):
        for lab in r.labels.split("|"):
            if lab != "No Finding":
                out[i, FINDINGS.index(lab)] = 1
    return out


# -- metadata ----------------------------------------------------------------
@pytest.mark.parametrize("name", [V2020_NAME, OLD_NAME])
@pytest.mark.parametrize("gz", [False, True])
def test_read_metadata_parses_real_format(tmp_path, name, gz):
    root = make_nih_root(tmp_path, n_patients=4, images_per_patient=3, image_size=16, metadata_name=name, gz=gz)
    assert (root / (name + ".gz" if gz else name)).is_file()
    df = nih.read_metadata(root)
    records = nih_records(4, 3, 16)
    assert list(df.columns) == ["image", "patient_id", "view", *FINDINGS]
    assert df["image"].tolist() == [r.name for r in records]
    assert df["patient_id"].tolist() == [str(r.patient) for r in records]
    assert set(df["view"]) == {"AP", "PA"}
    np.testing.assert_array_equal(df[list(FINDINGS)].to_numpy(), _label_matrix(records))
    assert all(pd.api.types.is_integer_dtype(df[f]) for f in FINDINGS)
    # "No Finding" rows are all zeros; "Cardiomegaly|Emphysema" sets exactly those two.
    assert df.loc[0, list(FINDINGS)].sum() == 0
    assert df.loc[1, ["Cardiomegaly", "Emphysema"]].tolist() == [1, 1] and df.loc[1, list(FINDINGS)].sum() == 2


def test_read_metadata_prefers_v2020_file(tmp_path):
    root = make_nih_root(tmp_path, n_patients=2, images_per_patient=2, image_size=16)
    lines = (root / V2020_NAME).read_text().splitlines()
    (root / OLD_NAME).write_text("\n".join(lines[:2]) + "\n")  # the old file: one row only
    assert len(nih.read_metadata(root)) == 4


def test_boxes_scale_by_png_size_not_original_image_size(tmp_path):
    """OriginalImage[Width,Height] is the scan before NIH resized it to the PNG; the box file's
    pixels are the PNG's, so boxes scale by image_size / PNG size (here 16 / 32)."""
    root = make_nih_root(tmp_path, n_patients=8, images_per_patient=3, image_size=32, official_split=True)
    originals = [line.split(",")[7:9] for line in (root / V2020_NAME).read_text().splitlines()[1:]]
    assert all(int(w) >= 2500 and int(h) >= 2048 for w, h in originals)  # as in the real file, never the PNG's 32
    ds = nih.NIHDataset.from_root(root, "test", image_size=16, cache_dir=tmp_path / "c")
    records = {r.name: r for r in nih_records(8, 3, 32)}
    checked = 0
    for i, name in enumerate(ds.ids):
        for finding, x, y, w, h in records[name].boxes:
            np.testing.assert_allclose(ds[i]["boxes"][FINDINGS.index(finding)].numpy(), [x / 2, y / 2, w / 2, h / 2], rtol=1e-6)
            checked += 1
    assert checked >= 1


def test_missing_root_and_csv_errors(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*Data_Entry_2017_v2020\.csv"):
        nih.read_metadata(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"Data_Entry_2017_v2020\.csv / Data_Entry_2017_v2020\.csv\.gz.*Data_Entry_2017\.csv"):
        nih.read_metadata(tmp_path / "empty")


def test_missing_columns_error_names_file_and_columns(tmp_path):
    root = tmp_path / "nih"
    root.mkdir()
    (root / V2020_NAME).write_text("Image Index,Labels\n00000001_000.png,Mass\n")
    with pytest.raises(DataError, match=r"Data_Entry_2017_v2020\.csv: missing column\(s\) Finding Labels, Patient ID, View Position"):
        nih.read_metadata(root)


def _corrupt_label(root, row: int, label: str) -> str:
    path = root / V2020_NAME
    lines = path.read_text().splitlines()
    fields = lines[row].split(",")
    fields[1] = label
    lines[row] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n")
    return fields[0]


def test_unknown_label_raises_naming_file_row_label_and_valid_ones(tmp_path):
    root = make_nih_root(tmp_path, n_patients=3, images_per_patient=2, image_size=16)
    image = _corrupt_label(root, 3, "Effusion|Pneumonitis")
    with pytest.raises(DataError) as err:
        nih.read_metadata(root)
    msg = str(err.value)
    for part in (V2020_NAME, "line 4", image, "'Pneumonitis'", "Pleural_Thickening", "data.on_error=skip"):
        assert part in msg


def test_unknown_label_and_duplicates_skipped_and_counted(tmp_path, caplog):
    root = make_nih_root(tmp_path, n_patients=3, images_per_patient=2, image_size=16)
    bad = _corrupt_label(root, 2, "Tumour")
    path = root / V2020_NAME
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines + [lines[4]]) + "\n")  # a duplicate row
    problems = ProblemLog("skip")
    df = nih.read_metadata(root, problems=problems)
    assert len(df) == 5 and bad not in set(df["image"]) and df["image"].is_unique
    assert len(problems.problems["unknown label"]) == 1 and len(problems.problems["duplicate image row"]) == 1
    with caplog.at_level(logging.WARNING):
        nih.read_metadata(root, on_error="skip")
    assert "skipped 2 problem" in caplog.text


# -- boxes -------------------------------------------------------------------
@pytest.mark.parametrize("gz", [False, True])
def test_read_bboxes_positional_values_and_spelling(tmp_path, gz):
    root = make_nih_root(tmp_path, n_patients=4, images_per_patient=3, image_size=32, gz=gz)
    text = (root / "BBox_List_2017.csv").read_text() if not gz else None
    if text is not None:
        assert text.splitlines()[0] == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
        assert ",Infiltrate," in text
    df = nih.read_bboxes(root)
    expected = [(r.name, *b) for r in nih_records(4, 3, 32) for b in r.boxes]
    assert list(df.columns) == ["image", "finding", "x", "y", "w", "h"]
    assert [tuple(row) for row in df.itertuples(index=False)] == expected  # exact floats, Infiltration
    assert "Infiltration" in set(df["finding"]) and df[["x", "y", "w", "h"]].dtypes.eq(np.float64).all()


def test_read_bboxes_rows_without_trailing_commas(tmp_path):
    root = tmp_path / "nih"
    root.mkdir()
    (root / "BBox_List_2017.csv").write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n00013118_008.png,Atelectasis,225.084745762712,547.019216763771,86.7796610169491,79.1864406779661\n"
    )
    row = nih.read_bboxes(root).iloc[0]
    assert (row.image, row.finding) == ("00013118_008.png", "Atelectasis")
    assert (row.x, row.y, row.w, row.h) == (225.084745762712, 547.019216763771, 86.7796610169491, 79.1864406779661)


def test_read_bboxes_errors_name_file_and_line(tmp_path):
    root = make_nih_root(tmp_path, n_patients=2, images_per_patient=3, image_size=16)
    path = root / "BBox_List_2017.csv"
    lines = path.read_text().splitlines()
    fields = lines[2].split(",")
    fields[2] = "abc"  # x of the second box
    lines[2] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"BBox_List_2017\.csv line 3 .*must be numbers"):
        nih.read_bboxes(root)
    path.unlink()
    with pytest.raises(DataError, match=r"BBox_List_2017\.csv / BBox_List_2017\.csv\.gz"):
        nih.read_bboxes(root)


# -- splits ------------------------------------------------------------------
def test_patient_split_no_leakage_fractions_and_seeded(tmp_path):
    rows = [(f"{p:08d}_{i:03d}.png", str(p)) for p in range(60) for i in range(1 + p % 4)]
    meta = pd.DataFrame(rows, columns=["image", "patient_id"])
    fractions = {"train": 0.7, "val": 0.1, "test": 0.2}
    splits = patient_split(meta, fractions, seed=3)
    assert sorted(sum(splits.values(), [])) == sorted(meta["image"])  # every image exactly once
    patient = dict(rows)
    owners = [{patient[n] for n in names} for names in splits.values()]
    assert not (owners[0] & owners[1] or owners[0] & owners[2] or owners[1] & owners[2])
    for s, f in fractions.items():
        assert abs(len(splits[s]) / len(meta) - f) < 0.05
    assert patient_split(meta, fractions, seed=3) == splits
    assert patient_split(meta, fractions, seed=4) != splits
    with pytest.raises(ValueError, match="sum to 1"):
        patient_split(meta, {"train": 0.7, "val": 0.1}, seed=0)


def test_make_splits_uses_official_lists(tmp_path):
    root = make_nih_root(tmp_path, n_patients=8, images_per_patient=2, image_size=16, official_split=True)
    meta = nih.read_metadata(root)
    splits = nih.make_splits(root, meta, val_fraction=0.25, seed=0)
    test_list = (root / "test_list.txt").read_text().split()
    assert splits["test"] == test_list
    assert sorted(splits["train"] + splits["val"]) == sorted((root / "train_val_list.txt").read_text().split())
    pid = dict(zip(meta["image"], meta["patient_id"], strict=True))
    assert not {pid[n] for n in splits["train"]} & {pid[n] for n in splits["val"]}
    assert 2 <= len(splits["val"]) <= 4  # about a quarter of the 12 train_val images, whole patients


def test_make_splits_without_lists_is_patient_wise(tmp_path):
    root = make_nih_root(tmp_path, n_patients=10, images_per_patient=2, image_size=16)
    meta = nih.read_metadata(root)
    splits = nih.make_splits(root, meta, val_fraction=0.2, test_fraction=0.2, seed=1)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    pid = dict(zip(meta["image"], meta["patient_id"], strict=True))
    sets = [{pid[n] for n in splits[s]} for s in ("train", "val", "test")]
    assert sum(len(s) for s in sets) == 10


def test_split_file_image_absent_from_metadata(tmp_path):
    root = make_nih_root(tmp_path, n_patients=4, images_per_patient=2, image_size=16, official_split=True)
    with open(root / "test_list.txt", "a") as f:
        f.write("99999999_000.png\n")
    meta = nih.read_metadata(root)
    with pytest.raises(DataError, match=r"99999999_000\.png.*test_list\.txt"):
        nih.make_splits(root, meta)
    problems = ProblemLog("skip")
    splits = nih.make_splits(root, meta, problems=problems)
    assert "99999999_000.png" not in splits["test"] and problems.count == 1


# -- image files -------------------------------------------------------------
@pytest.mark.parametrize("layout", ["images", "tarball"])
def test_find_images_in_both_layouts(tmp_path, layout):
    root = make_nih_root(tmp_path, n_patients=3, images_per_patient=3, image_size=16, layout=layout)
    if layout == "tarball":
        assert (root / "images_003" / "images").is_dir() and not (root / "images").exists()
    names = [r.name for r in nih_records(3, 3)]
    found = nih.find_images(root, names, ProblemLog())
    assert list(found) == names and all(p.is_file() and p.name == n for n, p in found.items())
    problems = ProblemLog("skip")
    found = nih.find_images(root, names + ["00000099_000.png"], problems)
    assert len(found) == 9 and problems.problems["missing image"] == ["00000099_000.png"]


def test_load_grayscale_converts_rgba_and_16bit(tmp_path):
    root = make_nih_root(tmp_path, n_patients=2, images_per_patient=2, image_size=16, rgba=1, sixteen_bit=2)
    modes = []
    for r in nih_records(2, 2):
        path = root / "images" / r.name
        with Image.open(path) as img:
            modes.append(img.mode)
        out = load_grayscale(path)
        assert out.dtype == np.uint8 and out.shape == (16, 16)
        np.testing.assert_array_equal(out, expected_pixels(r.index, 16))
    assert modes == ["RGBA", "I;16", "I;16", "L"]


def test_load_grayscale_16bit_uses_dtype_range_not_minmax(tmp_path):
    path = tmp_path / "dark.png"
    Image.fromarray(np.full((4, 4), 1000, np.uint16)).save(path)  # dark: 1000 / 65535
    np.testing.assert_array_equal(load_grayscale(path), np.full((4, 4), 4, np.uint8))


def test_load_grayscale_palette_and_la(tmp_path):
    gray = expected_pixels(1, 8)
    Image.fromarray(np.stack([gray, gray], -1)).save(tmp_path / "la.png")
    Image.fromarray(gray).convert("P").save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_grayscale(tmp_path / "la.png"), gray)
    np.testing.assert_array_equal(load_grayscale(tmp_path / "p.png"), gray)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_load_grayscale_corrupt_file_names_path(tmp_path, damage):
    good = tmp_path / "good.png"
    Image.fromarray(expected_pixels(0, 64)).save(good)
    bad = tmp_path / "00000001_000.png"
    data = good.read_bytes()
    bad.write_bytes(b"not a png at all" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(DataError, match=r"unreadable image .*00000001_000\.png"):
        load_grayscale(bad)


def test_resize_uint8_area_average_and_checks():
    img = np.array([[0, 100, 10, 10], [100, 0, 10, 10], [7, 7, 255, 255], [7, 7, 255, 255]], np.uint8)
    np.testing.assert_array_equal(resize_uint8(img, 2), [[50, 10], [7, 255]])
    assert resize_uint8(img, 8).shape == (8, 8)
    assert resize_uint8(img, 4) is img
    with pytest.raises(ValueError, match="uint8"):
        resize_uint8(img.astype(np.float32), 2)


# -- the data set ------------------------------------------------------------
def test_nih_dataset_items_and_box_scaling(tmp_path):
    root = make_nih_root(tmp_path, n_patients=8, images_per_patient=3, image_size=32, official_split=True)
    ds = nih.NIHDataset.from_root(root, "test", image_size=16, cache_dir=tmp_path / "cache")
    records = {r.name: r for r in nih_records(8, 3, 32)}
    assert ds.ids == (root / "test_list.txt").read_text().split()
    for i in range(len(ds)):
        item = ds[i]
        r = records[item["id"]]
        assert item["image"].shape == (1, 16, 16) and item["image"].dtype == torch.float32
        expected = resize_uint8(expected_pixels(r.index, 32), 16).astype(np.float32) / 255
        np.testing.assert_allclose(item["image"][0].numpy(), expected, atol=1e-7)
        assert item["labels"].dtype == torch.float32 and item["labels"].shape == (14,)
        assert item["patient_id"] == str(r.patient)
        assert item["boxes"].shape == (14, 4) and item["boxes"].dtype == torch.float32
        for finding, x, y, w, h in r.boxes:
            if finding != "Nodule" or len([b for b in r.boxes if b[0] == "Nodule"]) == 1:
                np.testing.assert_allclose(item["boxes"][FINDINGS.index(finding)].numpy(), np.array([x, y, w, h]) / 2, rtol=1e-6)
        boxed = {b[0] for b in r.boxes}
        for k, f in enumerate(FINDINGS):
            assert torch.isnan(item["boxes"][k]).all() == (f not in boxed)
    assert ds.labels.shape == (len(ds), 14)


def test_nih_dataset_boxes_only_and_enclosing_box(tmp_path):
    root = make_nih_root(tmp_path, n_patients=6, images_per_patient=3, image_size=64)
    records = nih_records(6, 3, 64)
    ds = nih.NIHDataset.from_root(root, "train", image_size=32, cache_dir=tmp_path / "c", test_fraction=0.0, val_fraction=0.0, boxes_only=True)
    assert sorted(ds.ids) == sorted(r.name for r in records if r.boxes)
    nodule = next(r for r in records if len([b for b in r.boxes if b[0] == "Nodule"]) == 2)
    (_, x0, y0, w0, h0), (_, x1, y1, w1, h1) = [b for b in nodule.boxes if b[0] == "Nodule"]
    x, y = min(x0, x1), min(y0, y1)
    enclosing = np.array([x, y, max(x0 + w0, x1 + w1) - x, max(y0 + h0, y1 + h1) - y]) * 32 / 64  # the PNGs are 64 px
    box = ds[ds.ids.index(nodule.name)]["boxes"][FINDINGS.index("Nodule")].numpy()
    np.testing.assert_allclose(box, enclosing, rtol=1e-6)


def test_nih_dataset_pickles_memmap_by_file_name(tmp_path):
    root = make_nih_root(tmp_path, n_patients=4, images_per_patient=2, image_size=16)
    ds = nih.NIHDataset.from_root(root, "train", image_size=16, cache_dir=tmp_path / "c", val_fraction=0.0, test_fraction=0.0)
    assert isinstance(ds.images, np.memmap)
    state = ds.__getstate__()["images"]
    assert state[0] == "memmap" and state[1] == ds.images.filename  # the file name, not the pixels
    clone = pickle.loads(pickle.dumps(ds))
    assert isinstance(clone.images, np.memmap)
    for i in range(len(ds)):
        assert torch.equal(clone[i]["image"], ds[i]["image"]) and clone[i]["id"] == ds[i]["id"]


def test_from_root_bad_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        nih.NIHDataset.from_root(tmp_path / "missing", "train", 16, cache_dir=tmp_path / "c")
    root = make_nih_root(tmp_path, n_patients=4, images_per_patient=2, image_size=16)
    kwargs = dict(image_size=16, cache_dir=tmp_path / "c", val_fraction=0.0, test_fraction=0.0)
    (root / "images" / "00000002_001.png").unlink()
    with pytest.raises(DataError, match=r"missing image: 00000002_001\.png"):
        nih.NIHDataset.from_root(root, "train", **kwargs)
    (root / "images" / "00000003_000.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    shutil.copy(root / "images" / "00000001_000.png", root / "images" / "00000002_001.png")
    with pytest.raises(DataError, match=r"unreadable image: .*00000003_000\.png"):
        nih.NIHDataset.from_root(root, "train", **kwargs)
    (root / V2020_NAME).rename(root / "elsewhere.csv")
    with pytest.raises(DataError, match=r"no NIH metadata file .*Data_Entry_2017_v2020\.csv"):
        nih.NIHDataset.from_root(root, "train", **kwargs)


def test_from_root_skip_leaves_out_and_counts(tmp_path, caplog):
    root = make_nih_root(tmp_path, n_patients=4, images_per_patient=2, image_size=16)
    (root / "images" / "00000002_001.png").unlink()
    (root / "images" / "00000003_000.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    _corrupt_label(root, 2, "Tumour")  # 00000001_001.png
    kwargs = dict(image_size=16, cache_dir=tmp_path / "c", val_fraction=0.0, test_fraction=0.0, on_error="skip")
    with caplog.at_level(logging.WARNING):
        ds = nih.NIHDataset.from_root(root, "train", **kwargs)
    assert len(ds) == 5
    assert not {"00000002_001.png", "00000003_000.png", "00000001_001.png"} & set(ds.ids)
    assert "skipped 3 problem" in caplog.text and "00000003_000.png" in caplog.text
    kept = {r.name: r.index for r in nih_records(4, 2)}
    for i in range(len(ds)):  # rows still line up with their images after skipped ones
        expected = expected_pixels(kept[ds.ids[i]], 16).astype(np.float32) / 255
        np.testing.assert_allclose(ds[i]["image"][0].numpy(), expected, atol=1e-7)


def test_box_past_the_png_edge_is_reported_not_misplaced(tmp_path):
    """Boxes are in the distributed PNG's pixels: one that ends past the PNG (here: images
    shrunk by hand to 32 px while the box file speaks of 1024 px) is an error naming the box."""
    root = make_nih_root(tmp_path, n_patients=8, images_per_patient=3, image_size=32, official_split=True)
    path = root / "BBox_List_2017.csv"
    lines = path.read_text().splitlines()
    image = lines[1].split(",")[0]
    lines.append(f"{image},Mass,500.0,300.0,100.0,80.0,,,")
    path.write_text("\n".join(lines) + "\n")
    kwargs = dict(image_size=16, cache_dir=tmp_path / "c", val_fraction=0.0)
    with pytest.raises(DataError, match=rf"box outside its image: BBox_List_2017\.csv {image} Mass.*32x32 PNG"):
        nih.NIHDataset.from_root(root, "test", **kwargs)
    problems_before = nih.load_splits(root, 16, tmp_path / "c", val_fraction=0.0, on_error="skip")
    assert problems_before.report["skipped"] == {"box outside its image": 1} and problems_before.report["images_skipped"] == 0
    split = next(s for s, ds in problems_before.datasets.items() if image in ds.ids)
    ds = problems_before.datasets[split]
    assert torch.isnan(ds[ds.ids.index(image)]["boxes"][FINDINGS.index("Mass")]).all()  # dropped, not misplaced
