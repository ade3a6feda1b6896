"""The preprocessing operations written once on numpy arrays, and the chain they make for the common case.

`transforms.py` wraps the same rules as MONAI transforms (for resampling and foreground cropping, which need
MONAI's samplers); when neither is asked for, `fast_chain` does the whole job in numpy, with no MetaTensor:
RAS reorientation is then only axis flips and permutations (nibabel.orientations), normalisation is a clip
and a scale, and padding/cropping is slicing. It writes the same arrays and affines as the MONAI chain
(tests/test_transforms_cache.py compares both on real 2D and 3D images) at a fraction of the time: MONAI's
per-image MetaTensor work was most of the cache stage's time.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from nibabel import orientations as ornt

from medssl.config import PreprocessConfig
from medssl.errors import DataError

RAS = (("L", "R"), ("P", "A"), ("I", "S"))   # explicit: MONAI's default labels are changing
PERCENTILE_SAMPLES = 262_144

# How each modality is brought to [0, 1]. CT values are calibrated (HU): a fixed window keeps them comparable
# across scanners. MR and unknown modalities have arbitrary units: robust percentiles. Radiographs: min-max of
# each image (their raw range depends on detector and exposure).
NORMALISERS = {"CT": "window", "MR": "percentiles", "CR": "minmax", "DX": "minmax", "MG": "minmax",
               "RG": "minmax", "PX": "minmax"}
DEFAULT_NORMALISER = "percentiles"


# ------------------------------------------------------------------------------------------ dimensions
def image_rank(spatial_shape: Sequence[int], spatial_dims: int, slices_from_3d: bool) -> tuple[int, bool]:
    """(rank the image enters the chain with, whether its trailing length-1 axis is dropped), or a DataError
    naming the setting when the image cannot enter a pipeline of `spatial_dims`."""
    rank, squeeze = len(spatial_shape), False
    if rank == 3 and spatial_dims == 2 and spatial_shape[-1] == 1:
        rank, squeeze = 2, True                                   # (X, Y, 1) -> (X, Y)
    if spatial_dims == 3 and (rank == 2 or 1 in spatial_shape):
        raise DataError(f"a 2D image {tuple(spatial_shape)} cannot enter a 3D pipeline",
                        where="preprocess.spatial_dims",
                        fix="use a 2D pipeline (spatial_dims: 2) for radiographs and single slices")
    if rank == 3 and spatial_dims == 2 and not slices_from_3d:
        raise DataError(f"a 3D volume {tuple(spatial_shape)} cannot enter a 2D pipeline",
                        where="preprocess.slices_from_3d",
                        fix="set preprocess.slices_from_3d: true to train 2D models on axial slices")
    if rank not in (2, 3):
        raise DataError(f"image has {rank} spatial dimensions; only 2D and 3D are supported",
                        where="preprocess", fix="split 4D series (e.g. fMRI) into 3D volumes first")
    return rank, squeeze


def in_plane_frame(affine: np.ndarray) -> np.ndarray:
    """2D: keep pixel order, keep only the pixel spacing (column norms) and origin of the affine."""
    affine = np.asarray(affine, dtype=np.float64)
    frame = np.eye(4)
    frame[0, 0], frame[1, 1] = np.linalg.norm(affine[:3, 0]), np.linalg.norm(affine[:3, 1])
    frame[:3, 3] = affine[:3, 3]
    return frame


def per_rank(values: Sequence, rank: int, keep) -> list:
    """Settings written for the pipeline's dims, applied to an image of `rank` dims (`keep` = native)."""
    values = list(values)
    return values + [keep] * (rank - len(values))


# ------------------------------------------------------------------------------------------ geometry
def to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C, X, Y, Z) reoriented so axis 0 runs left->right, 1 posterior->anterior, 2 inferior->superior, by
    flips and a permutation only (a view, no copy); the affine follows."""
    transform = ornt.ornt_transform(ornt.io_orientation(affine), ornt.axcodes2ornt("RAS", labels=RAS))
    spatial = array.shape[1:]
    order = [int(axis) for axis in transform[:, 0]]             # output axis k comes from input axis order^-1
    out = array
    for axis, flip in enumerate(transform[:, 1]):
        if flip < 0:
            out = np.flip(out, axis=1 + axis)
    out = np.moveaxis(out, [1 + i for i in range(3)], [1 + order[i] for i in range(3)])
    return out, np.asarray(affine, dtype=np.float64) @ ornt.inv_ornt_aff(transform, spatial)


def pad_or_crop(array: np.ndarray, affine: np.ndarray, size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad (symmetric, the odd voxel after) then centre-crop each axis to `size` (-1 keeps the axis),
    as MONAI's ResizeWithPadOrCrop; the affine's origin moves with the first kept voxel."""
    pads, crops, shift = [(0, 0)], [slice(None)], np.zeros(3)
    for axis, (n, want) in enumerate(zip(array.shape[1:], size)):
        want = n if want < 0 else int(want)
        before = max(want - n, 0) // 2
        pads.append((before, max(want - n, 0) - before))
        padded = max(n, want)
        start = max(padded // 2 - want // 2, 0)
        crops.append(slice(start, start + want))
        shift[axis] = start - before
    out = np.pad(array, pads) if any(p != (0, 0) for p in pads) else array
    moved = np.asarray(affine, dtype=np.float64).copy()
    rank = array.ndim - 1
    moved[:rank, 3] += moved[:rank, :rank] @ shift[:rank]
    return out[tuple(crops)], moved


# ------------------------------------------------------------------------------------------ intensity
def intensity_range(values: np.ndarray, modality: str, ct_window: Sequence[float],
                    mr_percentiles: Sequence[float]) -> tuple[str, float, float]:
    """(normaliser kind, low, high): the values mapped to 0 and 1 (NORMALISERS)."""
    kind = NORMALISERS.get((modality or "").upper(), DEFAULT_NORMALISER)
    if kind == "window":
        return kind, float(ct_window[0]), float(ct_window[1])
    if kind == "percentiles":
        # a regular subsample of at most ~256k voxels: the percentiles move by far less than one grey
        # level, and a full sort of every voxel would dominate the cache stage on large volumes
        sample = every_nth(values, max(1, values.size // PERCENTILE_SAMPLES))
        low, high = (float(v) for v in np.percentile(sample, mr_percentiles))
        return kind, low, high
    return kind, float(values.min()), float(values.max())


def memory_order(array: np.ndarray) -> str:
    """"F" when the array's fastest-varying axis is its first spatial one, else "C": the plain layout a copy
    of it can be made in with the fewest broken runs (np.save writes only C or F arrays at full speed)."""
    axes = [(abs(stride), axis) for axis, (stride, n) in enumerate(zip(array.strides, array.shape)) if n > 1]
    first = next((axis for axis, n in enumerate(array.shape) if n > 1), 0)
    return "F" if axes and min(axes)[1] == first and array.ndim > 1 and not array.flags.c_contiguous else "C"


def every_nth(values: np.ndarray, step: int) -> np.ndarray:
    """values.ravel()[::step], the same voxels in the same (C) order whatever the array's memory layout, but
    without ravel's full copy of a non-C-contiguous array (a DICOM stack is X-fastest)."""
    if step == 1 or values.flags.c_contiguous:
        return values.ravel()[::step]
    if values.shape[-1] % step == 0:        # flat index k*step = every step-th voxel of the last axis
        return values[..., ::step].ravel()
    return values[np.unravel_index(np.arange(0, values.size, step), values.shape)]


def inverted(kind: str, photometric: str) -> bool:
    """MONOCHROME1 (bright = low value) is inverted so bone is bright everywhere; CT never (HU are physical,
    the photometric tag only describes display)."""
    return kind != "window" and (photometric or "").upper() == "MONOCHROME1"


def normalise(array: np.ndarray, modality: str, photometric: str, ct_window: Sequence[float],
              mr_percentiles: Sequence[float], inplace: bool = False) -> np.ndarray:
    """float32 in [0, 1] (a constant image carries no contrast: all background). `inplace`: `array` is a
    float32 buffer of the caller's that may be overwritten (one pass and one 4-bytes-per-voxel buffer fewer)."""
    kind, low, high = intensity_range(array, modality, ct_window, mr_percentiles)
    out = array if inplace and array.dtype == np.float32 else np.array(array, dtype=np.float32)
    if high <= low:
        out[...] = 0.0
    else:
        np.clip(out, low, high, out=out)
        out -= np.float32(low)
        out /= np.float32(high - low)
    if inverted(kind, photometric):
        np.subtract(np.float32(1.0), out, out=out)
    return out


# ------------------------------------------------------------------------------------------ the chain
def fast_chain_applies(cfg: PreprocessConfig) -> bool:
    """No resampling, no foreground crop: every step is exact array work."""
    return cfg.spacing is None and not cfg.foreground_crop


def fast_chain(array: np.ndarray, affine: np.ndarray, modality: str, photometric: str,
               cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """(C, X, Y[, Z]) float32 -> ((C, *spatial) float32 in [0, 1], 4x4 affine), as build_preprocess(cfg)."""
    rank, squeeze = image_rank(array.shape[1:], cfg.spatial_dims, cfg.slices_from_3d)
    if squeeze:
        array = array[..., 0]
    if rank == 3:
        array, affine = to_ras(array, affine)
    else:
        affine = in_plane_frame(affine)
    # one copy, C or F as the source is closest to (a DICOM stack seen as (X, Y, Z) is X-fastest, so F; a
    # NIfTI is Fortran): a transposing copy costs several times a straight one, and the cache reads arrays
    # by index, whatever their layout. Then normalised in place.
    out = normalise(np.array(array, dtype=np.float32, order=memory_order(array)), modality, photometric,
                    cfg.ct_window, cfg.mr_percentiles, inplace=True)
    if cfg.size is not None:
        out, affine = pad_or_crop(out, affine, per_rank(cfg.size, rank, -1))
    return out, affine
