"""Image files to [0, 1] pixels: the same picture as 8- and 16-bit PNG, JPEG and DICOMs
(MONOCHROME1/2, rescaled, signed; written by pydicom) reads the same and gets the same
probabilities; DICOMs read as torchxrayvision reads them; bad files are named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dicom_fixtures import write_dicom
from PIL import Image

from causal_ie.data.errors import DataError
from causal_ie.data.images import is_dicom, load_grayscale, read_dicom, read_image

xrv = pytest.importorskip("torchxrayvision")
H, W = 200, 256  # not square, as radiographs are not


def picture() -> np.ndarray:
    """A smooth chest-like picture, 12-bit stored values [H, W] (0 .. 4095)."""
    y, x = np.mgrid[0:H, 0:W] / np.array([H, W])[:, None, None]
    lungs = np.exp(-(((x - 0.3) / 0.12) ** 2 + ((y - 0.5) / 0.3) ** 2)) + np.exp(-(((x - 0.7) / 0.12) ** 2 + ((y - 0.5) / 0.3) ** 2))
    p = 0.8 - 0.5 * lungs + 0.1 * np.sin(25 * y)  # dark lungs, bright mediastinum, rib-like stripes
    return np.round(np.clip(p, 0, 1) * 4095).astype(np.int64)


@pytest.fixture
def files(tmp_path):
    s = picture()
    out = {}
    Image.fromarray(np.round(s / 4095 * 255).astype(np.uint8)).save(out.setdefault("png8", tmp_path / "a.png"))
    Image.fromarray(np.round(s / 4095 * 65535).astype(np.uint16)).save(out.setdefault("png16", tmp_path / "b.png"))
    # JPEG is lossy: at quality 95 the pixels move by up to 0.03 and a probability by ~1e-3
    Image.fromarray(np.round(s / 4095 * 255).astype(np.uint8)).save(out.setdefault("jpeg", tmp_path / "c.jpg"), quality=100)
    # stored s, shown 2 s - 1000 (rescale): the range -1000 .. 7190 scales back to s / 4095
    out["mono2_rescaled"] = write_dicom(tmp_path / "d.dcm", s, "MONOCHROME2", slope=2, intercept=-1000)
    out["mono1"] = write_dicom(tmp_path / "e.dcm", 4095 - s, "MONOCHROME1")  # bright stored low
    out["signed16"] = write_dicom(tmp_path / "f", s * 16 - 32768, bits_stored=16, signed=True)  # no suffix
    return out


def test_every_format_of_the_same_picture_reads_the_same_pixels(files):
    reference = picture() / 4095
    tolerance = {"png8": 0.5 / 255 + 1e-6, "png16": 0.5 / 65535 + 1e-6, "jpeg": 0.03, "mono2_rescaled": 1e-6,
                 "mono1": 1e-6, "signed16": 1e-3}
    for name, path in files.items():
        pixels = read_image(path)
        assert pixels.dtype == np.float32 and pixels.shape == (H, W), name
        assert np.abs(pixels - reference).max() <= tolerance[name], name


def test_every_format_gets_the_same_probabilities(files):
    from causal_ie.models import XRVClassifier

    torch.manual_seed(0)
    model = XRVClassifier("random", input_resolution=64)
    with torch.no_grad():
        # a random network's logits are in the hundreds (all probabilities 0 or 1, blind to any
        # change): scale its head so the picture's logits spread over [-2, 2], where they are sensitive
        head = model.backbone.classifier
        logits = model(torch.from_numpy(picture() / 4095).float()[None, None])[0]
        scale = logits.std() / 2
        head.weight /= scale
        head.bias.copy_((head.bias - logits.mean()) / scale)  # new logits: (logits - mean) / scale
        probs = {n: model(torch.from_numpy(read_image(p))[None, None]).sigmoid()[0] for n, p in files.items()}
        inverted = model(torch.from_numpy(1 - read_image(files["mono1"]))[None, None]).sigmoid()[0]
    reference = probs["mono2_rescaled"]
    for name, p in probs.items():
        assert (p - reference).abs().max() <= 1e-3, (name, (p - reference).abs().max())
    # the model tells the picture from its negative: a MONOCHROME1 file read uninverted would fail
    assert (inverted - reference).abs().max() > 1e-2


def test_dicoms_read_as_torchxrayvision_reads_them(tmp_path):
    s = picture()
    for photometric, stored in (("MONOCHROME2", s), ("MONOCHROME1", 4095 - s)):
        path = write_dicom(tmp_path / f"{photometric}.dcm", stored, photometric)
        with pytest.warns(UserWarning, match="MONOCHROME1") if photometric == "MONOCHROME1" else _no_warning():
            theirs = xrv.utils.read_xray_dcm(path)  # [-1024, 1024]
        np.testing.assert_allclose(read_dicom(path) * 2048 - 1024, theirs, atol=1e-3)


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_the_window_is_applied_when_asked(tmp_path):
    # window centre 2048, width 1025 (DICOM's LINEAR: x <= c - 0.5 - (w-1)/2 -> bottom,
    # x > c - 0.5 + (w-1)/2 -> top, x = c - 0.5 -> the middle)
    stored = np.array([[0, 1535, 2047, 2560, 4095, 2047]], dtype=np.int64).repeat(2, 0)
    path = write_dicom(tmp_path / "w.dcm", stored, window=(2047.5, 1025))
    np.testing.assert_allclose(read_dicom(path)[0], stored[0] / 4095, atol=1e-7)  # no VOI: the stored range
    windowed = read_dicom(path, voi_lut=True)[0]
    np.testing.assert_allclose(windowed[[0, 1, 3, 4]], [0, 0, 1, 1], atol=1e-6)
    np.testing.assert_allclose(windowed[2], 0.5, atol=1e-6)


def test_load_grayscale_reads_dicoms_for_the_caches(files):
    gray = load_grayscale(files["mono1"])
    assert gray.dtype == np.uint8 and gray.shape == (H, W)
    np.testing.assert_array_equal(gray, np.round(picture() / 4095 * 255).astype(np.uint8))
    assert is_dicom(files["signed16"]) and not is_dicom(files["png8"])


def test_bad_files_are_named(tmp_path, files):
    truncated = tmp_path / "truncated.dcm"
    data = files["mono2_rescaled"].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"unreadable DICOM .*truncated\.dcm"):
        read_image(truncated)
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\0" * 128 + b"DICM" + b"not a data set" * 10)
    with pytest.raises(DataError, match=r"garbage\.dcm"):
        read_image(garbage)
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    with pytest.raises(DataError, match=r"unreadable image .*notes\.png: not a recognised image format"):
        read_image(notes)
    rgb = tmp_path / "rgb.dcm"
    write_dicom(rgb, picture(), "MONOCHROME2")
    ds = __import__("pydicom").dcmread(rgb)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.save_as(rgb)
    with pytest.raises(DataError, match=r"rgb\.dcm: PhotometricInterpretation PALETTE COLOR; expected MONOCHROME1"):
        read_image(rgb)
    with pytest.raises(DataError, match=r"missing\.dcm: file does not exist"):
        read_image(tmp_path / "missing.dcm")
