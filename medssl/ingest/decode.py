"""Load one manifest row into a float32 array with its RAS affine; read NIfTI headers for the scan.

Decisions (documented in data_manifests/README.md too):
* Arrays are channel-first (C, X, Y[, Z]); X = DICOM columns (i), Y = rows (j), Z = slices in manifest order.
* DICOM colour (RGB / YBR) images become one grey channel (ITU-R 601 luma), so every image of a dataset has
  the same channel count; `photometric` still reports the header's value. MONOCHROME1 is NOT inverted here:
  `photometric` says "MONOCHROME1" and normalisation inverts it.
* Rescale slope / intercept are applied per slice (per frame for Enhanced objects): values are in modality
  units (HU for CT).
* PNG / JPEG / TIFF ("image-2d"): first page, colour -> luma like DICOM, unit spacing, no patient geometry.
* NIfTI: 4D -> channels (the 4th axis); NaN / Inf voxels are replaced (NaN -> 0, +/-Inf -> the largest /
  smallest finite value) and reported in `problems`; the manifest flags such files when it is built.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_modality_lut

from medssl.ingest.dicom.assemble import multiframe_geometry, plane_affine, stack_affine
from medssl.ingest.dicom.fields import basic_fields, enhanced_geometry, rescale_of
from medssl.ingest.dicom.known import read_known
from medssl.ingest.dicom.parse import read_slice
from medssl.ingest.nifti_header import nifti_shape, nonfinite_problem
from medssl.errors import DataError

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass
class LoadedImage:
    array: np.ndarray        # (C, X, Y[, Z]) float32, not necessarily contiguous
    affine: np.ndarray       # (4, 4) voxel (i, j, k) -> RAS+ mm
    modality: str
    photometric: str
    problems: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------ NIfTI
def _load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    img = nib.load(path)
    spatial, channels = nifti_shape(img.shape)
    data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(*spatial, channels)  # (X, Y[, Z], C)
    problem = nonfinite_problem(int(np.isnan(data).sum()), int(np.isinf(data).sum()), data.size)
    if problem:
        finite = data[np.isfinite(data)]
        data = np.nan_to_num(data, nan=0.0, posinf=finite.max(), neginf=finite.min())
    return np.moveaxis(data, -1, 0), np.asarray(img.affine, dtype=float), [problem] if problem else []


# ------------------------------------------------------------------------------------------ PNG / JPEG / TIFF
RASTER_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 1, "RGB": 1, "RGBA": 1, "I;16": 2, "I;16B": 2, "I;16L": 2,
                "I": 4, "F": 4}  # bytes per sample of the Pillow modes medssl reads


def raster_header(path: str, max_image_mb: float) -> dict:
    """Size and mode of a PNG / JPEG / TIFF without decoding it (Pillow reads the header lazily)."""
    with Image.open(path) as im:
        width, height, mode, frames = im.width, im.height, im.mode, getattr(im, "n_frames", 1)
        bands = len(im.getbands())
    if mode not in RASTER_BYTES:
        return {"skip": f"unsupported: image mode {mode!r}"}
    declared_mb = width * height * bands * RASTER_BYTES[mode] / 2**20
    if declared_mb > max_image_mb:
        return {"skip": f"too large: {width}x{height} {mode} = {declared_mb:,.0f} MB > max_image_mb={max_image_mb:g}"}
    problems = [f"{frames} frames/pages: only the first is used"] if frames > 1 else []
    colour = mode in ("RGB", "RGBA", "P")
    return {"kind": "raster", "spatial_dims": 2, "shape": [width, height], "channels": 1, "spacing": [1.0, 1.0],
            "affine": plane_affine({}), "photometric": "RGB" if colour else "MONOCHROME2", "problems": problems}


def _load_raster(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    with Image.open(path) as im:
        im.seek(0)
        if im.mode in ("P", "RGBA", "LA", "1"):  # palette / alpha / bilevel: to plain grey or RGB first
            im = im.convert("RGB" if im.mode in ("P", "RGBA") else "L")
        pixels = np.asarray(im).astype(np.float32)  # (rows, columns[, 3])
    if pixels.ndim == 3:
        pixels = pixels[..., :3] @ LUMA
    return np.ascontiguousarray(pixels.T)[None], plane_affine({}), []  # (1, X, Y)


# ------------------------------------------------------------------------------------------ DICOM
def _grey(pixels: np.ndarray, ds) -> np.ndarray:
    """(..., R, C[, 3]) -> (..., R, C) float32; colour -> luma (pydicom already turned YBR into RGB)."""
    pixels = pixels.astype(np.float32, copy=False)
    if int(ds.get("SamplesPerPixel", 1) or 1) == 3:
        pixels = pixels @ LUMA
    return pixels


def _read_slice(path: Path) -> tuple[np.ndarray, Mapping]:
    """(R, C) float32 in modality units, and the header it came with (fast path: one read, no pydicom)."""
    stored, header, scale = _read_stored(path)
    if scale is None:
        return stored, header
    return stored.astype(np.float32) * np.float32(scale[0]) + np.float32(scale[1]), header


def _read_stored(path: Path) -> tuple[np.ndarray, Mapping, tuple[float, float] | None]:
    """(pixels, header, (slope, intercept) still to apply): stored integers from the fast reader, or float32
    modality units already rescaled (scale None) when pydicom had to decode the file."""
    fast = read_slice(str(path))
    if fast is not None:
        return fast[0], fast[1], rescale_of(fast[1])
    ds = pydicom.dcmread(path, force=True)  # preamble-less files were accepted by the scan
    return _modality_units(ds.pixel_array, ds), ds, None

def _modality_units(pixels: np.ndarray, ds) -> np.ndarray:
    """Stored values -> modality units: a Modality LUT Sequence through pydicom's apply_modality_lut (it
    takes precedence over rescale, as the standard says), else RescaleSlope / Intercept."""
    if "ModalityLUTSequence" in ds and int(ds.get("SamplesPerPixel", 1) or 1) == 1:
        return np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
    slope, intercept = rescale_of(ds)
    return _grey(pixels, ds) * np.float32(slope) + np.float32(intercept)


def _load_series(paths: list[Path]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(1, X, Y, Z) float32 in modality units. Slices are stacked as stored (Z, R, C), one contiguous copy
    each, and rescaled in one vectorised pass (per-slice slope/intercept broadcast along Z); the (X, Y, Z)
    result is a transposed view, laid out once by whoever copies it next (the cache's RAS copy)."""
    first, ds0, scale0 = _read_stored(paths[0])
    stack = np.empty((len(paths), *first.shape), dtype=first.dtype if scale0 else np.float32)  # (Z, R, C)
    scales = np.empty((len(paths), 2), dtype=np.float32)
    ds = ds0
    last = len(paths) - 1
    for k, path in enumerate(paths):
        # slices the index parsed are read without a second parse (known.py); the first and last in full,
        # their positions make the affine
        known = read_known(str(path)) if 0 < k < last else None
        if known is not None:
            plane, scale = known
        else:
            plane, ds, scale = (first, ds0, scale0) if k == 0 else _read_stored(path)
        if plane.shape != first.shape:
            raise DataError(f"slice {k} has {plane.shape} pixels, slice 0 has {first.shape}", where=str(path),
                            fix="rebuild the manifest: the series changed since it was indexed")
        if not np.can_cast(plane.dtype, stack.dtype, casting="safe"):   # a pydicom slice among stored ints
            stack = stack.astype(np.float32, copy=False)
        stack[k] = plane
        scales[k] = scale if scale is not None else (1.0, 0.0)
    volume = stack.astype(np.float32, copy=False)
    if (scales != scales[0]).any():
        volume *= scales[:, 0, None, None]
        volume += scales[:, 1, None, None]
    elif tuple(scales[0]) != (1.0, 0.0):
        volume *= scales[0, 0]
        volume += scales[0, 1]
    h0, h1 = basic_fields(ds0, str(paths[0]), ""), basic_fields(ds, str(paths[-1]), "")
    step = (np.asarray(h1["ipp"]) - np.asarray(h0["ipp"])) / (len(paths) - 1)
    affine = stack_affine(h0["iop"], h0["ipp"], h0["spacing"] or [1.0, 1.0], step)
    return volume.transpose(2, 1, 0)[None], affine, []   # (1, X, Y, Z) view of (Z, R, C)


def _frame_rescale(ds, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame (slope, intercept) of an Enhanced object: per-frame group, else shared group, else top level."""
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else {}
    frames = ds.get("PerFrameFunctionalGroupsSequence") or [{}] * n
    default = rescale_of(shared["PixelValueTransformationSequence"][0]) \
        if "PixelValueTransformationSequence" in shared else rescale_of(ds)
    pairs = [rescale_of(f["PixelValueTransformationSequence"][0]) if "PixelValueTransformationSequence" in f
             else default for f in frames]
    slopes, intercepts = np.asarray(pairs, dtype=np.float32).T
    return slopes, intercepts


def _load_multiframe(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    ds = pydicom.dcmread(path, force=True)  # preamble-less files were accepted by the scan
    h = basic_fields(ds, str(path), "")
    enhanced_geometry(ds, h)
    if "ModalityLUTSequence" in ds:  # one LUT for every frame
        frames = _modality_units(ds.pixel_array, ds).reshape(h["frames"], h["rows"], h["cols"])  # (F, R, C)
    else:
        frames = _grey(ds.pixel_array, ds).reshape(h["frames"], h["rows"], h["cols"])  # (F, R, C)
        slopes, intercepts = _frame_rescale(ds, h["frames"])
        frames = frames * slopes[:, None, None] + intercepts[:, None, None]
    order, affine, problems = multiframe_geometry(h)
    return np.ascontiguousarray(frames[order].transpose(2, 1, 0))[None], affine, problems  # (1, X, Y, Z)


def _load_2d(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    plane, ds = _read_slice(path)
    if plane.ndim != 2:
        raise DataError(f"expected one frame, found pixel array {plane.shape}", where=str(path),
                        fix="rebuild the manifest: the file changed since it was indexed")
    return np.ascontiguousarray(plane.T)[None], plane_affine(basic_fields(ds, str(path), "")), []  # (1, X, Y)


def decodable(path: str, frames: int = 1) -> bool:
    """Whether the pixels of one DICOM file decode (used to choose among copies of one SOPInstanceUID)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if frames > 1:
                pydicom.dcmread(path, force=True).pixel_array  # noqa: B018 - decoding is the test
            else:
                _read_slice(Path(path))
        return True
    except Exception:  # noqa: BLE001 - any failure means "not this copy"
        return False


# ------------------------------------------------------------------------------------------ entry point
READERS = {  # format -> reader of its file list
    "dicom-series": _load_series,
    "dicom-multiframe": lambda paths: _load_multiframe(paths[0]),
    "dicom-2d": lambda paths: _load_2d(paths[0]),
    "nifti": lambda paths: _load_nifti(paths[0]),
    "image-2d": lambda paths: _load_raster(paths[0]),
}


def confined_paths(row: Mapping, root: Path) -> list[Path]:
    """The row's files, resolved (links followed) and required to lie inside the manifest root: a manifest
    from elsewhere must not make medssl read `../../etc/passwd`, an absolute path or a link out of the folder.
    (String path operations: a series has hundreds of slices, and pathlib objects cost more than the stats.)"""
    base, folders, paths = os.path.realpath(root), {}, []
    for rel in str(row["paths"]).split("|"):
        parent, name = os.path.split(rel)
        if parent not in folders:   # a series' slices share a folder: resolve it once, not once per slice
            folders[parent] = os.path.realpath(os.path.join(base, parent))
        path = os.path.join(folders[parent], name)
        if name in ("", ".", "..") or os.path.islink(path):
            path = os.path.realpath(path)
        if not (path == base or path.startswith(base.rstrip(os.sep) + os.sep)):
            raise DataError(f"manifest path {rel[:200]!r} points outside the dataset folder {base}",
                            where=f"manifest row {row.get('image_id', '')}",
                            fix="manifest paths must be relative to its root, without '..', absolute parts or "
                                "links out of the folder; rebuild the manifest from the folder itself")
        paths.append(Path(path))
    return paths


def load_image(row: Mapping, root: Path) -> LoadedImage:
    """Decode the image of one manifest row. Raises DataError (naming the file) for anything unreadable."""
    fmt = str(row["format"])
    paths = confined_paths(row, root)
    if fmt not in READERS:
        raise DataError(f"unknown image format '{fmt}'", where=f"manifest row {row.get('image_id')}",
                        fix=f"rebuild the manifest with this medssl version (formats: {', '.join(READERS)})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # pydicom's per-file oddities would drown the log
            array, affine, problems = READERS[fmt](paths)
    except DataError:
        raise
    except Exception as err:  # pydicom / nibabel / numpy errors: say which file and what to do
        raise DataError(f"cannot decode image {row.get('image_id', '')}: {type(err).__name__}: {err}",
                        where=str(paths[0]),
                        fix="check the file (re-export or remove it) and rebuild the manifest") from err
    # not forced contiguous: a DICOM series is a transposed view of its slice stack, and every consumer copies
    # it once anyway (the cache's chain lays it out in RAS order), so a copy here would be a wasted pass
    return LoadedImage(np.asarray(array, dtype=np.float32), affine, str(row.get("modality") or ""),
                       str(row.get("photometric") or "MONOCHROME2"), tuple(problems))
