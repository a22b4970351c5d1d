"""Decoding chest radiographs (PNG, JPEG, DICOM) to grayscale arrays and resizing them.

:func:`read_image` gives any of them as float32 in [0, 1] (what a model takes);
:func:`load_grayscale` as uint8 (what the data sets' memmap caches hold). DICOMs are read
as torchxrayvision reads them (``xrv.utils.read_xray_dcm``: pydicom, the MONOCHROME1
inversion, the range 0 .. 2**BitsStored - 1, optionally the VOI LUT), plus what it leaves
out: the modality LUT (rescale slope and intercept) and signed pixels. Each DICOM is
scaled over the range its header allows, not stretched to its own minimum and maximum,
so intensities stay comparable across files; an unsigned MONOCHROME2 file without
rescale gives exactly torchxrayvision's pixels (mapped from [-1024, 1024] to [0, 1]).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from causal_ie.data.errors import DataError

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", *DICOM_SUFFIXES)


def is_dicom(path: str | Path) -> bool:
    """A DICOM file by its suffix or by the ``DICM`` marker after its 128-byte preamble."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def read_image(path: str | Path, voi_lut: bool = False) -> np.ndarray:
    """An image file as a float32 [H, W] array in [0, 1]: 8-bit files / 255, 16-bit / 65535,
    colour as luminance, DICOM by :func:`read_dicom` (``voi_lut`` applies its VOI LUT or window).

    Raises DataError naming the file when it cannot be read as an intensity image."""
    if is_dicom(path):
        return read_dicom(path, voi_lut=voi_lut)
    path = Path(path)
    with _opened(path) as img:
        if img.mode in _WIDE_INT_MODES:
            return (np.clip(np.array(img).astype(np.float64), 0, 65535) / 65535).astype(np.float32)
        if img.mode == "F":
            raise DataError(f"unsupported image {path}: 32-bit float pixels (mode F); expected 8- or 16-bit grayscale or RGB(A)")
        gray = img if img.mode == "L" else img.convert("L")
        return np.asarray(gray, dtype=np.float32) / 255.0


def read_dicom(path: str | Path, voi_lut: bool = False) -> np.ndarray:
    """A grayscale DICOM as float32 [H, W] in [0, 1] (see the module's docstring).

    Steps: stored pixels; the modality LUT (RescaleSlope/RescaleIntercept or a Modality LUT
    Sequence); with ``voi_lut``, the VOI LUT or window the file declares (the first);
    MONOCHROME1 inverted within the range; scaled from that range to [0, 1]."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except FileNotFoundError:
        raise DataError(f"unreadable DICOM {path}: file does not exist") from None
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError) as exc:
        raise DataError(f"unreadable DICOM {path}: not a valid DICOM file ({exc})") from None
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DataError(
            f"unsupported DICOM {path}: PhotometricInterpretation {photometric or 'missing'}; "
            "expected MONOCHROME1 or MONOCHROME2 (a grayscale radiograph)"
        )
    try:
        stored = ds.pixel_array
        bits = int(ds.BitsStored)
        signed = int(ds.get("PixelRepresentation", 0)) == 1
    except Exception as exc:  # pydicom raises many types for missing or truncated pixel data
        raise DataError(f"unreadable DICOM {path}: no decodable pixel data ({type(exc).__name__}: {exc})") from None
    if stored.ndim != 2:
        raise DataError(f"unsupported DICOM {path}: pixel data of shape {stored.shape}; expected one 2-D frame")
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    data = apply_modality_lut(stored, ds).astype(np.float64)
    if ds.get("ModalityLUTSequence"):
        low, high = 0, 2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1
    else:
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        low, high = sorted((low * slope + intercept, high * slope + intercept))
    if voi_lut and (ds.get("VOILUTSequence") or "WindowCenter" in ds):
        data = np.asarray(apply_voi_lut(data, ds, index=0), dtype=np.float64)
        if ds.get("VOILUTSequence"):  # a LUT's output range is its own; a window keeps the range
            low, high = 0, 2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1
    if photometric == "MONOCHROME1":  # bright is low: bones black, background white
        data = high + low - data
    return np.clip((data - low) / max(high - low, 1e-12), 0.0, 1.0).astype(np.float32)

# Pillow modes holding 16-bit (or wider integer) samples. A 16-bit PNG opens as
# "I;16" (or "I" in older Pillow), so "I" is read on the 16-bit range too.
_WIDE_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def load_grayscale(path: str | Path) -> np.ndarray:
    """Decode an image file to a uint8 [H, W] grayscale array (a DICOM: :func:`read_dicom`, rounded).

    8-bit gray is returned as stored; colour, palette and alpha images are
    converted to luminance with the alpha channel dropped (a few NIH files are
    RGBA); 16-bit images are mapped to 8 bits over the full 16-bit range, not
    stretched per image, so intensities stay comparable across files.

    Raises DataError naming the file when it is missing, truncated, corrupt or
    in a pixel format that is not an intensity image.
    """
    if is_dicom(path):
        return np.round(read_dicom(path) * 255).astype(np.uint8)
    path = Path(path)
    with _opened(path) as img:
        if img.mode == "L":
            return np.array(img, dtype=np.uint8)
        if img.mode in _WIDE_INT_MODES:
            return _wide_to_uint8(np.array(img))
        if img.mode == "F":
            raise DataError(f"unsupported image {path}: 32-bit float pixels (mode F); expected 8- or 16-bit grayscale or RGB(A)")
        # RGB, RGBA, LA, P, PA, 1, CMYK ...: Pillow's L conversion ignores alpha.
        return np.array(img.convert("L"), dtype=np.uint8)


class _opened:
    """``with _opened(path) as img``: a decoded Pillow image, or DataError naming the file."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> Image.Image:
        try:
            self.img = Image.open(self.path)
            self.img.load()  # decode now: truncated data only surfaces here
        except FileNotFoundError:
            raise DataError(f"unreadable image {self.path}: file does not exist") from None
        except UnidentifiedImageError:
            raise DataError(f"unreadable image {self.path}: not a recognised image format (corrupt file?)") from None
        except (OSError, ValueError, SyntaxError) as exc:  # Pillow's truncated / corrupt streams
            raise DataError(f"unreadable image {self.path}: {exc}") from None
        return self.img

    def __exit__(self, *exc) -> None:
        self.img.close()


def _wide_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Map 16-bit samples to 8 bits with rounding: v * 255 / 65535 (65535 -> 255, v*257 -> v)."""
    wide = np.clip(arr.astype(np.int64), 0, 65535)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def resize_uint8(img: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 [H, W] image to [size, size].

    Downsampling averages areas (Pillow BOX), which avoids the aliasing of
    point sampling at 1024 -> 224; upsampling is bilinear. An image already of
    the wanted size is returned unchanged.
    """
    if not isinstance(img, np.ndarray) or img.ndim != 2 or img.dtype != np.uint8:
        got = f"{type(img).__name__} {getattr(img, 'dtype', '')} {getattr(img, 'shape', '')}"
        raise ValueError(f"resize_uint8 expects a uint8 [H, W] array, got {got}")
    size = int(size)
    if size < 1:
        raise ValueError(f"resize_uint8: size must be >= 1, got {size}")
    h, w = img.shape
    if (h, w) == (size, size):
        return img
    method = Image.Resampling.BOX if size < min(h, w) else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(img).resize((size, size), resample=method), dtype=np.uint8)
