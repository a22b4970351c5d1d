"""One-off preprocessing cache: decoded, resized images in a uint8 memory map.

Decoding 1024x1024 PNGs dominates an NIH epoch, so every image is decoded and
resized once to ``size x size`` and stored as raw uint8 in
``<cache_dir>/<key>.u8``, with a JSON sidecar ``<key>.json`` holding the shape,
which rows are valid and each file's own (width, height) before resizing: the
NIH boxes are in those pixels, so they are scaled by them, never by the
metadata's ``OriginalImage`` size. The key hashes the ordered file names, the
size and the file sizes, so a different file list, size or a replaced file
gives a new cache. Both files are written under temporary names and renamed
into place, the sidecar last: a cache without its sidecar is ignored, so an
interrupted pass never leaves a cache that a later run would trust. A
version-1 cache (no file sizes) is upgraded by reading the PNG headers, not
decoded again; one that cannot be upgraded is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from causal_ie.data.errors import DataError, ProblemLog
from causal_ie.data.images import load_grayscale, resize_uint8
from causal_ie.io import atomic_write_text

log = logging.getLogger(__name__)

# Bump when the stored format or the decoding changes, so old caches are not reused.
# 2: the sidecar records each file's (width, height) before resizing ("sizes").
CACHE_VERSION = 2

Decoder = Callable[[Path], np.ndarray]  # one file -> uint8 [H, W] at its stored size


class CachedImages(NamedTuple):
    """What :func:`build_cache` returns."""

    images: np.ndarray  # uint8 [N, size, size], read-only memory map
    valid: np.ndarray  # bool [N]: False where the file could not be decoded (zeros in images)
    sizes: np.ndarray  # int64 [N, 2]: (width, height) of each file before resizing; 0 where invalid


def cache_key(paths: Sequence[str | Path], size: int, version: int = CACHE_VERSION, decoder: str = "") -> str:
    """The cache key of an ordered file list at ``size``: a hash of names, size and file sizes
    (and of the decoder's name, when another than the default decodes the files)."""
    h = hashlib.sha256(f"causal_ie-cache-v{int(version)}|size={int(size)}{'|' + decoder if decoder else ''}".encode())
    for p in paths:
        p = Path(p)
        try:
            nbytes = p.stat().st_size
        except OSError:
            nbytes = -1  # decoding will report the file; the key still must be defined
        h.update(f"|{p.name}:{nbytes}".encode())
    return h.hexdigest()[:24]


def build_cache(
    paths: Sequence[str | Path],
    size: int,
    cache_dir: str | Path,
    problems: ProblemLog,
    *,
    num_threads: int | None = None,
    decode: Decoder | None = None,
) -> CachedImages:
    """Decode and resize every file of ``paths`` once; return (images, valid, sizes).

    ``images`` is a read-only uint8 memory map [N, size, size] in the order of
    ``paths``; ``valid`` a bool [N] that is False for files that could not be
    decoded (their rows are zeros; the caller leaves them out); ``sizes`` the
    int [N, 2] (width, height) of each file as stored, which the caller needs
    to scale coordinates given in the file's pixels. Unreadable files are
    reported to ``problems`` as "unreadable image": with ``on_error="raise"``
    the first one raises DataError and no cache is kept. A second call with
    the same files and size reads the existing cache without decoding anything.

    ``decode`` reads one file as a uint8 [H, W] array at its stored size (default
    :func:`~causal_ie.data.images.load_grayscale`), raising DataError for a bad file; its
    ``__name__`` is part of the cache key.
    """
    paths = [Path(p) for p in paths]
    size = int(size)
    if size < 1:
        raise ValueError(f"build_cache: size must be >= 1, got {size}")
    if not paths:
        return CachedImages(np.zeros((0, size, size), np.uint8), np.zeros(0, bool), np.zeros((0, 2), np.int64))
    cache_dir = Path(cache_dir)
    decoder = "" if decode is None else f"{decode.__module__}.{getattr(decode, '__qualname__', type(decode).__name__)}"
    key = cache_key(paths, size, decoder=decoder)
    data_file, meta_file = cache_dir / f"{key}.u8", cache_dir / f"{key}.json"

    cached = _open_existing(data_file, meta_file, len(paths), size)
    if cached is None and decode is None:  # version 1 caches were all decoded by load_grayscale
        cached = _upgrade_v1(paths, size, cache_dir, data_file, meta_file)
    if cached is not None:
        log.info("reusing image cache %s (%d images at %dpx)", data_file, len(paths), size)
        # A cache built with on_error=skip remembers its bad files: report them
        # again so a later run with on_error=raise still refuses them.
        for i in np.flatnonzero(~cached.valid):
            problems.report("unreadable image", str(paths[i]), cached.reasons.get(paths[i].name, "recorded in the image cache"))
        return CachedImages(cached.images, cached.valid, cached.sizes)
    _create_cache_dir(cache_dir)
    _write_cache(paths, size, data_file, meta_file, problems, num_threads, decode or load_grayscale)  # reports bad files as it meets them
    cached = _open_existing(data_file, meta_file, len(paths), size)
    if cached is None:  # pragma: no cover - only if another process deletes it meanwhile
        raise DataError(f"image cache {data_file} vanished right after it was written")
    return CachedImages(cached.images, cached.valid, cached.sizes)


def _create_cache_dir(cache_dir: Path) -> None:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the image cache folder {cache_dir} ({exc}); set data.cache_dir to a writable folder") from None
    if not os.access(cache_dir, os.W_OK):
        raise DataError(f"the image cache folder {cache_dir} is not writable; set data.cache_dir to a writable folder")


class _Stored(NamedTuple):
    images: np.memmap
    valid: np.ndarray
    sizes: np.ndarray
    reasons: dict[str, str]


def _read_sidecar(data_file: Path, meta_file: Path, n: int, size: int) -> dict | None:
    """The sidecar of a complete cache of ``n`` images at ``size``, else None."""
    if not (data_file.is_file() and meta_file.is_file()):
        return None
    try:
        meta = json.loads(meta_file.read_text())
        shape = tuple(meta["shape"])
        valid = np.asarray(meta["valid"], dtype=bool)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable image cache sidecar %s (%s); rebuilding", meta_file, exc)
        return None
    if shape != (n, size, size) or valid.shape != (n,) or data_file.stat().st_size != n * size * size:
        log.warning("ignoring inconsistent image cache %s; rebuilding", data_file)
        return None
    return meta


def _open_existing(data_file: Path, meta_file: Path, n: int, size: int) -> _Stored | None:
    """The cache at ``data_file`` if complete, consistent and of this version, else None (then it is rebuilt)."""
    meta = _read_sidecar(data_file, meta_file, n, size)
    if meta is None:
        return None
    valid = np.asarray(meta["valid"], dtype=bool)
    try:
        if meta.get("version") != CACHE_VERSION:
            raise ValueError(f"version {meta.get('version')}, expected {CACHE_VERSION}")
        sizes = np.asarray(meta["sizes"], dtype=np.int64).reshape(n, 2)
        reasons = dict(meta.get("invalid", {}))
    except (KeyError, TypeError, ValueError) as exc:
        # Never serve images without their file sizes: the boxes would be scaled wrongly.
        log.warning("ignoring image cache %s without valid file sizes (%s); rebuilding", data_file, exc)
        return None
    if (sizes[valid] <= 0).any():
        log.warning("ignoring image cache %s: a valid row has no file size; rebuilding", data_file)
        return None
    return _Stored(np.memmap(data_file, dtype=np.uint8, mode="r", shape=(n, size, size)), valid, sizes, reasons)


def _upgrade_v1(paths: list[Path], size: int, cache_dir: Path, data_file: Path, meta_file: Path) -> _Stored | None:
    """Turn a version-1 cache of these files (no file sizes) into this version, or None.

    The pixels of version 1 are decoded the same way; only the (width, height)
    of each valid file is missing, and the PNG header holds it, so the upgrade
    reads headers instead of decoding 100,000 images again.
    """
    old_data, old_meta = cache_dir / f"{cache_key(paths, size, 1)}.u8", cache_dir / f"{cache_key(paths, size, 1)}.json"
    meta = _read_sidecar(old_data, old_meta, len(paths), size)
    if meta is None or meta.get("version", 1) != 1:
        return None
    valid = np.asarray(meta["valid"], dtype=bool)
    sizes = np.zeros((len(paths), 2), np.int64)
    for i in np.flatnonzero(valid):
        try:
            with Image.open(paths[i]) as img:
                sizes[i] = img.size  # (width, height) from the header, no decoding
        except (OSError, ValueError, SyntaxError) as exc:
            # The old cache cannot be trusted for this file any more: drop it, the caller rebuilds.
            log.warning("cannot upgrade image cache %s: %s unreadable (%s); rebuilding", old_data, paths[i], exc)
            for old in (old_meta, old_data):  # the sidecar first: data without one is never read
                old.unlink(missing_ok=True)
            return None
    try:
        os.replace(old_data, data_file)
        meta.update(version=CACHE_VERSION, sizes=sizes.tolist())
        atomic_write_text(meta_file, json.dumps(meta))  # the sidecar last: its presence marks a complete cache
        old_meta.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot upgrade image cache %s (%s); rebuilding", old_data, exc)
        return None
    log.info("upgraded image cache %s to version %d (file sizes read from %d PNG headers)", data_file, CACHE_VERSION, int(valid.sum()))
    return _open_existing(data_file, meta_file, len(paths), size)


def _decode(path: Path, size: int, decode: Decoder) -> tuple[np.ndarray | None, tuple[int, int], str]:
    """Decode + resize one file in a worker thread: (image, (width, height) of the file, reason).
    Failures come back as a reason, not an exception."""
    try:
        img = decode(path)
    except DataError as exc:
        # load_grayscale's message starts with "unreadable image <path>: "; keep the reason only.
        return None, (0, 0), str(exc).removeprefix(f"unreadable image {path}: ")
    return resize_uint8(img, size), (img.shape[1], img.shape[0]), ""


def _write_cache(
    paths: list[Path], size: int, data_file: Path, meta_file: Path, problems: ProblemLog, num_threads: int | None,
    decode: Decoder,
) -> None:
    n = len(paths)
    tmp_data = data_file.with_name(f"{data_file.name}.tmp{os.getpid()}")
    tmp_meta = meta_file.with_name(f"{meta_file.name}.tmp{os.getpid()}")
    workers = num_threads or min(8, os.cpu_count() or 1)
    log.info("building image cache %s: decoding %d images to %dx%d with %d threads", data_file, n, size, size, workers)
    valid = np.ones(n, dtype=bool)
    sizes = np.zeros((n, 2), dtype=np.int64)
    reasons: dict[str, str] = {}
    out = None
    try:
        out = np.memmap(tmp_data, dtype=np.uint8, mode="w+", shape=(n, size, size))
        chunk = 16 * workers  # bounded look-ahead: at most this many decoded images wait in memory
        with (
            ThreadPoolExecutor(max_workers=workers) as pool,
            Progress(
                TextColumn("caching images"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                disable=not sys.stderr.isatty(),
            ) as progress,
        ):
            task = progress.add_task("cache", total=n)
            for start in range(0, n, chunk):
                batch = paths[start : start + chunk]
                for offset, (img, file_size, reason) in enumerate(pool.map(_decode, batch, [size] * len(batch), [decode] * len(batch))):
                    i = start + offset
                    sizes[i] = file_size
                    if img is None:
                        valid[i] = False
                        reasons[paths[i].name] = reason
                        problems.report("unreadable image", str(paths[i]), reason)
                    else:
                        out[i] = img
                progress.advance(task, len(batch))
        out.flush()
        del out
        out = None
        os.replace(tmp_data, data_file)
        meta = {
            "version": CACHE_VERSION,
            "shape": [n, size, size],
            "valid": valid.tolist(),
            "sizes": sizes.tolist(),
            "invalid": reasons,
        }
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp_meta, meta_file)  # the sidecar last: its presence marks a complete cache
    except BaseException:
        del out
        for tmp in (tmp_data, tmp_meta):
            tmp.unlink(missing_ok=True)
        raise


def default_cache_dir(root: str | Path, source: str = "nih") -> Path:
    """Where a source's image cache goes without ``data.cache_dir``: beside the data
    (``.causal_ie_cache``, NIH's directly, another source's in its own folder), else in the user cache."""
    root = Path(root).expanduser()
    if os.access(root, os.W_OK):
        return root / ".causal_ie_cache" if source == "nih" else root / ".causal_ie_cache" / source
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "causal_ie" / source
