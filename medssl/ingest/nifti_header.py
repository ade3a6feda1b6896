"""What the manifest needs from a NIfTI file, with every size the header declares checked BEFORE any voxel is
read or allocated.

Checks, cheapest first (a header is 348 bytes; what it declares can be terabytes):
* max_image_mb against the declared array;
* plain .nii: the file must hold vox_offset + the declared voxel bytes (a 608-byte file declaring 1000^3
  float32 is refused from its size alone);
* .nii.gz: deflate cannot expand data more than ~1032x, so a declared size beyond that ratio is impossible;
  a large declared size (>= BOMB_MIN_MB) at a ratio above BOMB_RATIO is refused as a decompression bomb (real
  scans compress 2-20x; even mostly-empty masks stay far below it); the gzip ISIZE trailer (uncompressed
  size mod 2^32) must account for the voxels, and where it does not (truncated, or several gzip members)
  the stream is decompressed with a cap to decide;
* NaN / Inf voxels are counted by streaming the voxel bytes in CHUNK-sized pieces: memory stays bounded
  whatever the declared size.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib

import nibabel as nib
import numpy as np

from medssl.errors import DataError

DEFLATE_MAX_RATIO = 1032      # the most deflate can expand its input (258-byte matches in ~2 bits)
BOMB_RATIO, BOMB_MIN_MB = 200, 256
CHUNK = 8 * 2**20             # bytes decompressed / inspected at a time


def nifti_shape(shape: tuple) -> tuple[list[int], int]:
    """(spatial shape, channels) of a NIfTI array shape; trailing singleton axes beyond 4 are ignored."""
    shape = list(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape.pop()
    if len(shape) > 4:
        raise DataError(f"NIfTI with {len(shape)} dimensions {tuple(shape)} is not supported",
                        fix="split it into 3D or 4D files")
    channels = shape[3] if len(shape) == 4 else 1
    spatial = shape[:3]
    if len(spatial) == 3 and spatial[2] == 1:
        spatial = spatial[:2]  # one slice: a 2D image
    return spatial, channels


def nonfinite_problem(nan: int, inf: int, size: int) -> str | None:
    if nan + inf == 0:
        return None
    if nan + inf == size:
        raise DataError("the image holds no finite voxel (all NaN / Inf)", fix="re-export the image")
    return f"non-finite voxels: {nan} NaN, {inf} Inf (replaced at load: NaN -> 0, Inf -> finite max/min)"


def _gzip_isize(path: str) -> int | None:
    """The gzip trailer's ISIZE (uncompressed length mod 2^32 of the last member), None if not gzip."""
    with open(path, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            return None
        f.seek(-4, os.SEEK_END)
        return struct.unpack("<I", f.read(4))[0]


def _stream(path: str, offset: int, nbytes: int, visit=None) -> int:
    """Bytes of the voxel data actually present (<= nbytes), read CHUNK at a time; `visit(chunk)` sees each."""
    opener = gzip.open if path.endswith(".gz") else open
    seen = 0
    try:
        with opener(path, "rb") as f:
            f.seek(offset)
            while seen < nbytes:
                chunk = f.read(min(CHUNK, nbytes - seen))
                if not chunk:
                    break
                seen += len(chunk)
                if visit is not None:
                    visit(chunk)
    except (EOFError, zlib.error, gzip.BadGzipFile):
        pass  # a truncated or corrupt stream: what was read so far is what the file holds
    return seen


def _size_problem(path: str, offset: int, nbytes: int) -> str | None:
    """Refusal from sizes alone, or None; only a disagreeing gzip trailer costs a (capped) decompression."""
    size, need = os.path.getsize(path), offset + nbytes
    if not path.endswith(".gz"):
        return None if size >= need else f"truncated: header declares {need:,} bytes, the file holds {size:,}"
    isize = _gzip_isize(path)
    if isize is None:
        return "unreadable NIfTI: .nii.gz name but not gzip data"
    ratio = need / max(size, 1)
    if ratio > BOMB_RATIO and need >= BOMB_MIN_MB * 2**20:  # first: whether or not the data is really there
        return (f"decompression bound: {size / 2**20:,.1f} MB of gzip declares {need / 2**20:,.0f} MB "
                f"({ratio:,.0f}x, above {BOMB_RATIO}x); if the image is genuine, store it uncompressed (.nii)")
    if ratio > DEFLATE_MAX_RATIO:
        return (f"truncated: header declares {need / 2**20:,.1f} MB, more than {size:,} gzip bytes can hold "
                f"(deflate expands at most {DEFLATE_MAX_RATIO}x)")
    if need < 2**32 and isize < need and _stream(path, offset, nbytes) < nbytes:
        return f"truncated: header declares {need:,} bytes uncompressed, the gzip stream ends early"
    return None


def _nonfinite_scan(path: str, offset: int, dtype: np.dtype, size: int) -> str | None:
    """Count NaN / Inf voxels by streaming; a stream shorter than declared is a truncation."""
    counts = [0, 0]

    def visit(chunk: bytes) -> None:
        values = np.frombuffer(chunk[:len(chunk) - len(chunk) % dtype.itemsize], dtype=dtype)
        counts[0] += int(np.isnan(values).sum())
        counts[1] += int(np.isinf(values).sum())

    if _stream(path, offset, size * dtype.itemsize, visit) < size * dtype.itemsize:
        return "truncated"
    return nonfinite_problem(counts[0], counts[1], size)


def nifti_header(path: str, max_image_mb: float) -> dict:
    """Header fields for the manifest, or {"skip": reason}; no voxel is read before the sizes agree."""
    img = nib.load(path)  # header only: the voxels stay on disk
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):  # e.g. CIFTI-2 matrices: not voxel grids
        return {"skip": f"unsupported: {type(img).__name__} is not a NIfTI volume"}
    spatial, channels = nifti_shape(img.shape)
    dtype = img.header.get_data_dtype()
    size = int(np.prod(img.shape, dtype=np.int64))
    declared_mb = size * dtype.itemsize / 2**20
    if declared_mb > max_image_mb:
        return {"skip": f"too large: header declares {img.shape} {dtype} = {declared_mb:,.0f} MB "
                        f"> max_image_mb={max_image_mb:g}"}
    offset = int(img.dataobj.offset)  # the on-disk vox_offset (img.header is a copy that may say 0)
    reason = _size_problem(path, offset, size * dtype.itemsize)
    if reason:
        return {"skip": reason}
    affine = np.asarray(img.affine, dtype=float)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        return {"skip": "bad geometry: the NIfTI affine is singular or not finite"}
    problems = []
    if np.issubdtype(dtype, np.floating):
        problem = _nonfinite_scan(path, offset, dtype, size)
        if problem == "truncated":
            return {"skip": "truncated: the voxel data ends before the size the header declares"}
        problems += [problem] if problem else []
    zooms = [float(z) for z in img.header.get_zooms()[:len(spatial)]]
    return {"kind": "nifti", "spatial_dims": len(spatial), "shape": spatial, "channels": channels,
            "spacing": zooms, "affine": affine, "problems": problems}
