"""Decoding chest radiographs to 8-bit grayscale arrays and resizing them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from causal_ie.data.errors import DataError

# Pillow modes holding 16-bit (or wider integer) samples. A 16-bit PNG opens as
# "I;16" (or "I" in older Pillow), so "I" is read on the 16-bit range too.
_WIDE_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def load_grayscale(path: str | Path) -> np.ndarray:
    """Decode an image file to a uint8 [H, W] grayscale array.

    8-bit gray is returned as stored; colour, palette and alpha images are
    converted to luminance with the alpha channel dropped (a few NIH files are
    RGBA); 16-bit images are mapped to 8 bits over the full 16-bit range, not
    stretched per image, so intensities stay comparable across files.

    Raises DataError naming the file when it is missing, truncated, corrupt or
    in a pixel format that is not an intensity image.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()  # decode now: truncated data only surfaces here
            mode = img.mode
            if mode == "L":
                return np.array(img, dtype=np.uint8)
            if mode in _WIDE_INT_MODES:
                return _wide_to_uint8(np.array(img))
            if mode == "F":
                raise DataError(
                    f"unsupported image {path}: 32-bit float pixels (mode F); "
                    "expected 8- or 16-bit grayscale or RGB(A)"
                )
            # RGB, RGBA, LA, P, PA, 1, CMYK ...: Pillow's L conversion ignores alpha.
            return np.array(img.convert("L"), dtype=np.uint8)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"unreadable image {path}: file does not exist") from None
    except UnidentifiedImageError:
        raise DataError(f"unreadable image {path}: not a recognised image format (corrupt file?)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        # Pillow reports truncated / corrupt streams as OSError or SyntaxError.
        raise DataError(f"unreadable image {path}: {exc}") from None


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
