"""One-off preprocessing cache: decoded, resized images in a uint8 memory map.

Decoding 1024x1024 PNGs dominates an NIH epoch, so every image is decoded and
resized once to ``size x size`` and stored as raw uint8 in
``<cache_dir>/<key>.u8``, with a JSON sidecar ``<key>.json`` holding the shape
and which rows are valid. The key hashes the ordered file names, the size and
the file sizes, so a different file list, size or a replaced file gives a new
cache. Both files are written under temporary names and renamed into place,
the sidecar last: a cache without its sidecar is ignored, so an interrupted
pass never leaves a cache that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from causal_ie.data.errors import DataError, ProblemLog
from causal_ie.data.images import load_grayscale, resize_uint8

log = logging.getLogger(__name__)

# Bump when the stored format or the decoding changes, so old caches are not reused.
CACHE_VERSION = 1


def cache_key(paths: Sequence[str | Path], size: int) -> str:
    """The cache key of an ordered file list at ``size``: a hash of names, size and file sizes."""
    h = hashlib.sha256(f"causal_ie-cache-v{CACHE_VERSION}|size={int(size)}".encode())
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
) -> tuple[np.ndarray, np.ndarray]:
    """Decode and resize every file of ``paths`` once; return (images, valid).

    ``images`` is a read-only uint8 memory map [N, size, size] in the order of
    ``paths``; ``valid`` a bool [N] that is False for files that could not be
    decoded (their rows are zeros; the caller leaves them out). Unreadable
    files are reported to ``problems`` as "unreadable image": with
    ``on_error="raise"`` the first one raises DataError and no cache is kept.
    A second call with the same files and size reads the existing cache
    without decoding anything.
    """
    paths = [Path(p) for p in paths]
    size = int(size)
    if size < 1:
        raise ValueError(f"build_cache: size must be >= 1, got {size}")
    if not paths:
        return np.zeros((0, size, size), np.uint8), np.zeros(0, bool)
    cache_dir = Path(cache_dir)
    key = cache_key(paths, size)
    data_file, meta_file = cache_dir / f"{key}.u8", cache_dir / f"{key}.json"

    cached = _open_existing(data_file, meta_file, len(paths), size)
    if cached is not None:
        log.info("reusing image cache %s (%d images at %dpx)", data_file, len(paths), size)
        images, valid, reasons = cached
        # A cache built with on_error=skip remembers its bad files: report them
        # again so a later run with on_error=raise still refuses them.
        for i in np.flatnonzero(~valid):
            problems.report("unreadable image", str(paths[i]), reasons.get(paths[i].name, "recorded in the image cache"))
        return images, valid
    _create_cache_dir(cache_dir)
    _write_cache(paths, size, data_file, meta_file, problems, num_threads)  # reports bad files as it meets them
    cached = _open_existing(data_file, meta_file, len(paths), size)
    if cached is None:  # pragma: no cover - only if another process deletes it meanwhile
        raise DataError(f"image cache {data_file} vanished right after it was written")
    images, valid, _ = cached
    return images, valid


def _create_cache_dir(cache_dir: Path) -> None:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the image cache folder {cache_dir} ({exc}); set data.cache_dir to a writable folder") from None
    if not os.access(cache_dir, os.W_OK):
        raise DataError(f"the image cache folder {cache_dir} is not writable; set data.cache_dir to a writable folder")


def _open_existing(data_file: Path, meta_file: Path, n: int, size: int) -> tuple[np.memmap, np.ndarray, dict[str, str]] | None:
    """The cache at ``data_file`` if complete and consistent, else None (then it is rebuilt)."""
    if not (data_file.is_file() and meta_file.is_file()):
        return None
    try:
        meta = json.loads(meta_file.read_text())
        shape = tuple(meta["shape"])
        valid = np.asarray(meta["valid"], dtype=bool)
        reasons = dict(meta.get("invalid", {}))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable image cache sidecar %s (%s); rebuilding", meta_file, exc)
        return None
    if shape != (n, size, size) or valid.shape != (n,) or data_file.stat().st_size != n * size * size:
        log.warning("ignoring inconsistent image cache %s; rebuilding", data_file)
        return None
    return np.memmap(data_file, dtype=np.uint8, mode="r", shape=shape), valid, reasons


def _decode(path: Path, size: int) -> tuple[np.ndarray | None, str]:
    """Decode + resize one file in a worker thread; failures come back as a reason, not an exception."""
    try:
        return resize_uint8(load_grayscale(path), size), ""
    except DataError as exc:
        # load_grayscale's message starts with "unreadable image <path>: "; keep the reason only.
        return None, str(exc).removeprefix(f"unreadable image {path}: ")


def _write_cache(
    paths: list[Path], size: int, data_file: Path, meta_file: Path, problems: ProblemLog, num_threads: int | None
) -> None:
    n = len(paths)
    tmp_data = data_file.with_name(f"{data_file.name}.tmp{os.getpid()}")
    tmp_meta = meta_file.with_name(f"{meta_file.name}.tmp{os.getpid()}")
    workers = num_threads or min(8, os.cpu_count() or 1)
    log.info("building image cache %s: decoding %d images to %dx%d with %d threads", data_file, n, size, size, workers)
    valid = np.ones(n, dtype=bool)
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
                for offset, (img, reason) in enumerate(pool.map(_decode, batch, [size] * len(batch))):
                    i = start + offset
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
        meta = {"version": CACHE_VERSION, "shape": [n, size, size], "valid": valid.tolist(), "invalid": reasons}
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp_meta, meta_file)  # the sidecar last: its presence marks a complete cache
    except BaseException:
        del out
        for tmp in (tmp_data, tmp_meta):
            tmp.unlink(missing_ok=True)
        raise
