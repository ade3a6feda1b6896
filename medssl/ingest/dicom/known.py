"""Slices the index has already parsed, so that the cache does not parse them again.

The index (scan.py) reads every DICOM header; the cache (decode.py) then reads every slice again for its
pixels, and walking each header a second time was about a sixth of the cache's time. Within one process — a
pipeline's manifest stage, then its cache stage, whose workers are forked from it and inherit this table —
the scan's answer is kept per file: where the raw pixels lie, their type and their rescale, under the file's
identity at scan time (size, mtime, inode, ctime; ctime cannot be set back by a user). A file whose identity
has changed since, a file not in the table (another process, a spawned worker) or anything unusual is parsed
as before, so the table can only skip work, never change a value (tests/test_ingest_fast_paths.py).
"""
from __future__ import annotations

import os

import numpy as np

from medssl.ingest.dicom.parse import pixels_at

# absolute path -> (identity, (dtype, rows, columns, offset), (slope, intercept)); one build's worth
_KNOWN: dict[str, tuple] = {}


def identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    return stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns


def remember(entries: dict[str, tuple]) -> None:
    """The slices of the latest index, replacing the previous one's (memory stays one build's worth)."""
    _KNOWN.clear()
    _KNOWN.update(entries)


def read_known(path: str) -> tuple[np.ndarray, tuple[float, float]] | None:
    """(pixels (Rows, Columns) as stored, (slope, intercept)) of a slice the index parsed, if unchanged."""
    entry = _KNOWN.get(path)
    if entry is None:
        return None
    key, layout, scale = entry
    try:
        with open(path, "rb") as f:
            if identity(os.fstat(f.fileno())) != key:
                return None
            buf = f.read()
    except OSError:
        return None
    pixels = pixels_at(buf, layout)
    return None if pixels is None else (pixels, scale)
