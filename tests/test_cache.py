"""The one-off decode + resize cache: built once, reused, atomic, remembers bad files and file sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from nih_fixtures import expected_pixels
from PIL import Image

from causal_ie.data import cache
from causal_ie.data.errors import DataError, ProblemLog
from causal_ie.data.images import load_grayscale, resize_uint8


@pytest.fixture
def pngs(tmp_path):
    """Six 24 px PNGs: gray, one RGBA and one 16-bit."""
    folder = tmp_path / "png"
    folder.mkdir()
    paths = []
    for i in range(6):
        px = expected_pixels(i, 24)
        img = Image.fromarray(px)
        if i == 1:
            img = Image.fromarray(np.stack([px, px, px, np.full_like(px, 9)], -1))
        if i == 2:
            img = Image.fromarray(px.astype(np.uint16) * 257)
        path = folder / f"{i + 1:08d}_000.png"
        img.save(path)
        paths.append(path)
    return paths


@pytest.fixture
def count_decodes(monkeypatch):
    """Counts the files the cache decodes."""
    calls = []

    def counting(path):
        calls.append(path)
        return load_grayscale(path)

    monkeypatch.setattr(cache, "load_grayscale", counting)
    return calls


def test_cache_matches_direct_resize_and_is_reused(tmp_path, pngs, count_decodes):
    images, valid, sizes = cache.build_cache(pngs, 16, tmp_path / "c", ProblemLog(), num_threads=2)
    assert isinstance(images, np.memmap) and images.shape == (6, 16, 16) and images.dtype == np.uint8
    assert valid.all() and len(count_decodes) == 6
    for i, p in enumerate(pngs):
        np.testing.assert_array_equal(images[i], resize_uint8(load_grayscale(p), 16))
        np.testing.assert_array_equal(images[i], resize_uint8(expected_pixels(i, 24), 16))
    files = sorted(f.name for f in (tmp_path / "c").iterdir())
    key = cache.cache_key(pngs, 16)
    assert files == [f"{key}.json", f"{key}.u8"]
    meta = json.loads((tmp_path / "c" / f"{key}.json").read_text())
    assert meta["shape"] == [6, 16, 16] and meta["valid"] == [True] * 6
    assert meta["version"] == cache.CACHE_VERSION and meta["sizes"] == [[24, 24]] * 6
    assert sizes.tolist() == [[24, 24]] * 6

    count_decodes.clear()
    again, valid2, sizes2 = cache.build_cache(pngs, 16, tmp_path / "c", ProblemLog())
    assert count_decodes == [] and valid2.all() and sizes2.tolist() == sizes.tolist()
    np.testing.assert_array_equal(again, images)


def test_cache_key_depends_on_order_size_and_file_size(pngs):
    key = cache.cache_key(pngs, 16)
    assert cache.cache_key(pngs, 16) == key
    assert cache.cache_key(pngs[::-1], 16) != key
    assert cache.cache_key(pngs, 32) != key
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(pngs[0])  # same name, new content and size
    assert cache.cache_key(pngs, 16) != key


def test_interrupted_build_leaves_no_cache(tmp_path, pngs, monkeypatch):
    calls = []

    def failing(path):
        calls.append(path)
        if len(calls) == 4:
            raise KeyboardInterrupt  # e.g. Ctrl-C half way
        return load_grayscale(path)

    monkeypatch.setattr(cache, "load_grayscale", failing)
    with pytest.raises(KeyboardInterrupt):
        cache.build_cache(pngs, 16, tmp_path / "c", ProblemLog(), num_threads=1)
    assert list((tmp_path / "c").iterdir()) == []  # no partial data, temp or sidecar file

    monkeypatch.setattr(cache, "load_grayscale", load_grayscale)
    images, valid, _ = cache.build_cache(pngs, 16, tmp_path / "c", ProblemLog())
    assert valid.all()
    np.testing.assert_array_equal(images[5], resize_uint8(expected_pixels(5, 24), 16))


def test_data_file_without_sidecar_is_rebuilt(tmp_path, pngs, count_decodes):
    cache.build_cache(pngs, 16, tmp_path / "c", ProblemLog())
    key = cache.cache_key(pngs, 16)
    (tmp_path / "c" / f"{key}.json").unlink()  # as if killed between the two renames
    (tmp_path / "c" / f"{key}.u8").write_bytes(b"\0" * 10)
    count_decodes.clear()
    images, _, _ = cache.build_cache(pngs, 16, tmp_path / "c", ProblemLog())
    assert len(count_decodes) == 6
    np.testing.assert_array_equal(images[0], resize_uint8(expected_pixels(0, 24), 16))


def test_unreadable_image_raise_and_skip(tmp_path, pngs, count_decodes):
    pngs[3].write_bytes(pngs[3].read_bytes()[:45])  # truncated inside the pixel data
    with pytest.raises(DataError, match=r"unreadable image: .*00000004_000\.png.*data\.on_error=skip"):
        cache.build_cache(pngs, 16, tmp_path / "c", ProblemLog())
    assert list((tmp_path / "c").iterdir()) == []

    problems = ProblemLog("skip")
    images, valid, sizes = cache.build_cache(pngs, 16, tmp_path / "c", problems)
    assert valid.tolist() == [True, True, True, False, True, True]
    assert sizes[3].tolist() == [0, 0] and sizes[4].tolist() == [24, 24]
    assert problems.problems["unreadable image"] == [str(pngs[3])]
    assert not images[3].any()
    np.testing.assert_array_equal(images[4], resize_uint8(expected_pixels(4, 24), 16))

    # Reuse: nothing decoded, the bad file still reported (raise refuses it, skip counts it once).
    count_decodes.clear()
    with pytest.raises(DataError, match=r"00000004_000\.png"):
        cache.build_cache(pngs, 16, tmp_path / "c", ProblemLog())
    problems = ProblemLog("skip")
    _, valid, _ = cache.build_cache(pngs, 16, tmp_path / "c", problems)
    assert count_decodes == [] and problems.count == 1 and not valid[3]


def test_empty_list_and_bad_cache_dir(tmp_path, pngs):
    images, valid, sizes = cache.build_cache([], 16, tmp_path / "c", ProblemLog())
    assert images.shape == (0, 16, 16) and valid.shape == (0,) and sizes.shape == (0, 2)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match="data.cache_dir"):
        cache.build_cache(pngs, 16, blocker / "c", ProblemLog())


def test_records_each_files_own_width_and_height(tmp_path, count_decodes):
    """Boxes are in the file's pixels, so the cache keeps every file's size before resizing."""
    paths = []
    for i, (w, h) in enumerate([(40, 24), (24, 40), (1024, 1024)]):
        paths.append(tmp_path / f"{i:08d}_000.png")
        Image.fromarray(expected_pixels(i, max(w, h))[:h, :w]).save(paths[-1])
    images, valid, sizes = cache.build_cache(paths, 16, tmp_path / "c", ProblemLog())
    assert valid.all() and sizes.dtype == np.int64 and sizes.tolist() == [[40, 24], [24, 40], [1024, 1024]]
    np.testing.assert_array_equal(images[0], resize_uint8(expected_pixels(0, 40)[:24, :40], 16))


def _as_version_1(tmp_path, paths, size):
    """Turn the cache of ``paths`` into what version 1 wrote: its key, no ``sizes`` in the sidecar."""
    new_key, old_key = cache.cache_key(paths, size), cache.cache_key(paths, size, version=1)
    assert new_key != old_key
    folder = tmp_path / "c"
    meta = json.loads((folder / f"{new_key}.json").read_text())
    (folder / f"{new_key}.u8").rename(folder / f"{old_key}.u8")
    (folder / f"{new_key}.json").unlink()
    (folder / f"{old_key}.json").write_text(json.dumps({k: meta[k] for k in ("shape", "valid", "invalid")} | {"version": 1}))
    return folder, new_key, old_key


def test_version_1_cache_is_upgraded_from_png_headers_without_decoding(tmp_path, pngs, count_decodes):
    pngs[3].write_bytes(pngs[3].read_bytes()[:45])  # a bad file recorded by the old cache
    cache.build_cache(pngs, 16, tmp_path / "c", ProblemLog("skip"))
    folder, new_key, old_key = _as_version_1(tmp_path, pngs, 16)
    count_decodes.clear()
    problems = ProblemLog("skip")
    images, valid, sizes = cache.build_cache(pngs, 16, folder, problems)
    assert count_decodes == []  # headers only
    assert valid.tolist() == [True, True, True, False, True, True] and problems.count == 1
    assert sizes.tolist() == [[24, 24]] * 3 + [[0, 0]] + [[24, 24]] * 2
    np.testing.assert_array_equal(images[5], resize_uint8(expected_pixels(5, 24), 16))
    assert sorted(f.name for f in folder.iterdir()) == [f"{new_key}.json", f"{new_key}.u8"]
    assert json.loads((folder / f"{new_key}.json").read_text())["version"] == cache.CACHE_VERSION


def test_cache_without_file_sizes_is_never_served(tmp_path, pngs, count_decodes):
    """A sidecar under the current key that lacks sizes (or has the old version) is rebuilt."""
    cache.build_cache(pngs, 16, tmp_path / "c", ProblemLog())
    meta_file = tmp_path / "c" / f"{cache.cache_key(pngs, 16)}.json"
    meta = json.loads(meta_file.read_text())
    for broken in ({k: v for k, v in meta.items() if k != "sizes"}, meta | {"version": 1}, meta | {"sizes": [[0, 0]] * 6}):
        meta_file.write_text(json.dumps(broken))
        count_decodes.clear()
        _, _, sizes = cache.build_cache(pngs, 16, tmp_path / "c", ProblemLog())
        assert len(count_decodes) == 6 and sizes.tolist() == [[24, 24]] * 6


def test_version_1_cache_whose_file_is_gone_is_rebuilt(tmp_path, pngs, count_decodes):
    cache.build_cache(pngs, 16, tmp_path / "c", ProblemLog())
    folder, new_key, _ = _as_version_1(tmp_path, pngs, 16)
    pngs[2].write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * (pngs[2].stat().st_size - 8))  # same size, header broken
    count_decodes.clear()
    problems = ProblemLog("skip")
    _, valid, _ = cache.build_cache(pngs, 16, folder, problems)
    assert len(count_decodes) == 6 and not valid[2] and problems.count == 1
    assert sorted(f.name for f in folder.iterdir()) == [f"{new_key}.json", f"{new_key}.u8"]  # the old one removed
    assert json.loads((folder / f"{new_key}.json").read_text())["version"] == cache.CACHE_VERSION
