"""Segmentation masks as labels: the labels CSV's `mask` column, read, joined and checked against the image.

A `mask` cell is the path of a label map, relative to the labels CSV's folder (or absolute): a NIfTI file of
integer labels (0 = background), or a DICOM SEG object (read with highdicom; its segments become labels
1..N). The manifest gets four columns when the labels CSV has a mask column:
- `mask`: the mask path relative to the scanned folder ("" when there is none or it is unusable);
- `mask_grid`: "same" (the image's grid within MASK_TOLERANCE_MM) or "resampled" (another grid over the same
  anatomy: the cache resamples it onto the image with nearest neighbour);
- `mask_labels`: the label values present, e.g. "0|1|2" (the segmentation stage checks them against the
  configured classes);
- `has_mask`: a label column (1 = the mask has foreground, 0 = an empty mask, <NA> = no usable mask), so a
  mask-only labels CSV still gives splits something to stratify on.
An unreadable mask, a mask of another rank, or one that does not cover the image flags the row (`problems`)
and leaves it without a mask; it never stops the manifest.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from medssl.errors import DataError

MASK_COLUMN = "mask"
MASK_TOLERANCE_MM = 0.01          # affine entries (mm) within this count as the same grid
MIN_OVERLAP = 0.5                 # share of the mask's field of view that must lie inside the image
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def read_mask(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """(labels (X, Y[, Z]) int32, 4x4 voxel -> RAS affine). DataError for anything unusable."""
    path = Path(path)
    if not path.is_file():
        raise DataError("mask file not found", where=str(path), fix="check the path in the labels CSV's mask column")
    try:
        array, affine = _read_seg(path) if _is_dicom(path) else _read_nifti(path)
    except DataError:
        raise
    except Exception as err:   # nibabel / highdicom / pydicom errors: name the file
        raise DataError(f"mask unreadable: {type(err).__name__}: {err}", where=str(path),
                        fix="give a NIfTI label map or a DICOM SEG file") from None
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3):
        raise DataError(f"mask has shape {array.shape}; a label map is 2D or 3D", where=str(path))
    if not np.allclose(array, np.round(array)):
        raise DataError("mask holds non-integer values (a probability map?)", where=str(path),
                        fix="threshold it into integer labels (0 = background)")
    return array.astype(np.int32), affine


def _is_dicom(path: Path) -> bool:
    with path.open("rb") as handle:
        head = handle.read(132)
    return head[128:132] == b"DICM"


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(path)
    return np.asanyarray(image.dataobj), image.affine


def _read_seg(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        import highdicom as hd
    except ImportError:
        raise DataError("DICOM SEG masks need the highdicom package", where=str(path),
                        fix="pip install highdicom (or give NIfTI label maps)") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg = hd.seg.segread(path)
        volume = seg.get_volume(combine_segments=True)   # segments -> labels 1..N on one grid
    return np.asarray(volume.array), LPS_TO_RAS @ np.asarray(volume.affine)   # highdicom works in LPS


def _three(shape) -> list[int]:
    return [int(v) for v in shape] + [1] * (3 - len(shape))


def _corners(shape, affine) -> tuple[np.ndarray, np.ndarray]:
    """World bounding box (min, max) of the voxel centres."""
    idx = np.array(np.meshgrid(*[[0, s - 1] for s in shape], indexing="ij")).reshape(len(shape), -1)
    idx = np.vstack([idx, np.zeros((3 - len(shape), idx.shape[1]))])
    world = affine[:3, :3] @ idx + affine[:3, 3:4]
    return world.min(1), world.max(1)


def compare_grid(mask_shape, mask_affine, image_shape, image_affine, image_dims: int) -> str:
    """"same" | "resampled"; DataError when the mask cannot label this image."""
    mask_dims = sum(1 for s in mask_shape if s > 1)
    if image_dims == 3 and mask_dims < 3 <= sum(1 for s in image_shape if s > 1):
        raise DataError(f"a 2D mask {tuple(mask_shape)} cannot label a 3D image {tuple(image_shape)}",
                        fix="give a label map with the image's slices (one 3D file per image)")
    mask_shape, image_shape = _three(mask_shape), _three(image_shape)   # a 2D image is its (X, Y, 1) volume
    if mask_shape == image_shape and np.allclose(mask_affine, image_affine, atol=MASK_TOLERANCE_MM):
        return "same"
    (mlo, mhi), (ilo, ihi) = _corners(mask_shape, mask_affine), _corners(image_shape, image_affine)
    extent = mhi - mlo
    inside = np.clip(np.minimum(mhi, ihi) - np.maximum(mlo, ilo), 0, None) / np.maximum(extent, 1e-6)
    # an axis the mask does not extend along (one slice): inside when the slice lies within the image's slab
    slab = 0.5 * np.abs(image_affine[:3, :3]).sum(axis=1) + MASK_TOLERANCE_MM
    flat = extent < 1e-3
    inside[flat] = ((mlo >= ilo - slab) & (mlo <= ihi + slab))[flat]
    overlap = float(np.prod(inside))
    if overlap < MIN_OVERLAP:
        raise DataError(f"mask on another grid that does not cover the image ({overlap:.0%} of its field of view "
                        f"inside; mask {np.round(mlo, 1).tolist()}..{np.round(mhi, 1).tolist()} mm, image "
                        f"{np.round(ilo, 1).tolist()}..{np.round(ihi, 1).tolist()} mm)",
                        fix="give the mask drawn on this image (same series, same frame of reference)")
    return "resampled"


def check_mask(path: Path, image_shape, image_affine, image_dims: int) -> dict:
    """The manifest's mask fields for one image; problem is "" or why the mask is not used."""
    try:
        array, affine = read_mask(path)
        grid = compare_grid(array.shape, affine, image_shape, image_affine, image_dims)
    except DataError as err:
        return {"mask_grid": "", "mask_labels": "", "has_mask": pd.NA, "problem": f"mask {path.name}: {err.what}"}
    values = np.unique(array)
    if (values < 0).any():
        return {"mask_grid": "", "mask_labels": "", "has_mask": pd.NA,
                "problem": f"mask {path.name}: negative label values {values[values < 0].tolist()}"}
    empty = not (values > 0).any()   # kept: "no lesion here" is a label, but say so (a wrong export looks alike)
    return {"mask_grid": grid, "mask_labels": "|".join(str(int(v)) for v in values), "has_mask": int(not empty),
            "problem": f"mask {path.name}: empty (no foreground voxel), kept as a negative" if empty else ""}


def mask_table(frame: pd.DataFrame, source: Path) -> pd.Series:
    """The labels CSV's mask column as absolute paths (index: the CSV's rows); "" = no mask."""
    base = Path(source).resolve().parent
    return frame[MASK_COLUMN].map(lambda v: str((base / v).resolve()) if str(v).strip() else "")


def join_masks(masks: pd.Series, image_keys: list[list[str]]) -> list[str]:
    """Mask path per image (keys most specific first, as labels.join_labels); "" where none matched."""
    lookup = {key: value for key, value in masks.items() if value}
    return [next((lookup[k] for k in keys if k in lookup), "") for keys in image_keys]


def attach_masks(df: pd.DataFrame, images: list[dict], paths: list[str], root: Path) -> pd.DataFrame:
    """Add mask / mask_grid / mask_labels / has_mask to the manifest rows (same order as `images`)."""
    rows = []
    for image, path in zip(images, paths):
        if not path:
            rows.append({"mask": "", "mask_grid": "", "mask_labels": "", "has_mask": pd.NA, "problem": ""})
            continue
        info = check_mask(Path(path), image["shape"], np.asarray(image["affine"], float), int(image["spatial_dims"]))
        usable = info["mask_grid"] != ""
        rows.append({**info, "mask": os.path.relpath(path, root) if usable else ""})
    extra = pd.DataFrame(rows, index=df.index)
    problems = ["; ".join(p for p in (old, new) if p) for old, new in zip(df["problems"], extra["problem"])]
    out = df.drop(columns=["problems"]).assign(
        mask=extra["mask"], mask_grid=extra["mask_grid"], mask_labels=extra["mask_labels"],
        has_mask=pd.array(extra["has_mask"].tolist(), dtype="Int64"))
    out["problems"] = problems
    return out


def mask_files(masks: pd.Series | None, folder: Path) -> list[Path]:
    """Mask files inside the scanned folder: excluded from the scan (they are labels, not images)."""
    if masks is None:
        return []
    return [Path(p) for p in masks if p and Path(p).is_relative_to(Path(folder).resolve())]
