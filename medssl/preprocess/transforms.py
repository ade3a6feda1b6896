"""The MONAI preprocessing chain run ONCE per image before caching (medssl/data/cache.py).

Input: {"image": MetaTensor (C, X, Y[, Z]) with a 4x4 voxel->RAS affine, "modality": str, "photometric": str}.
Steps: match the pipeline's spatial_dims -> orient 3D volumes to RAS -> resample to `spacing` -> modality-aware
intensity normalisation to [0, 1] -> optional foreground crop -> pad/crop to `size`.

Geometry decisions:
- 3D volumes are reoriented to RAS, so axis 0 runs left->right, 1 posterior->anterior, 2 inferior->superior and
  `[..., k]` is an axial slice (the 2D loader draws those).
- 2D images keep their stored (display) pixel order: projection radiographs rarely carry a reliable patient
  orientation, and flipping only those that do would make a dataset inconsistent. Their affine is reduced to
  an in-plane frame diag(sx, sy) so resampling sees the true pixel spacing whatever plane the header names.
- A 2D pipeline (spatial_dims 2) takes 2D images and (X, Y, 1) volumes; with `slices_from_3d` it keeps volumes
  3D and applies `spacing` / `size` in-plane only (the slice axis keeps its native spacing and length).
- Everything is normalised before padding, so padding with 0 pads with background.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (Compose, CropForegroundd, MapTransform, Orientationd, ResizeWithPadOrCropd,
                              Spacingd, Transform)

from medssl.config import PreprocessConfig
from medssl.errors import DataError, MedsslError

RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))   # explicit: MONAI's default is changing
FOREGROUND_LEVEL = 0.05   # of the [0, 1] range: above MR background noise, below any tissue in a CT window

# How each modality is brought to [0, 1]. CT values are calibrated (HU): a fixed window keeps them comparable
# across scanners. MR and unknown modalities have arbitrary units: robust percentiles. Radiographs: min-max of
# each image (their raw range depends on detector and exposure).
NORMALISERS = {"CT": "window", "MR": "percentiles", "CR": "minmax", "DX": "minmax", "MG": "minmax",
               "RG": "minmax", "PX": "minmax"}
DEFAULT_NORMALISER = "percentiles"


# ------------------------------------------------------------------------------- input conversion
def make_input(array: np.ndarray, affine: np.ndarray, modality: str, photometric: str) -> dict:
    """The dict the chain expects, from io.load_image's fields. array: (C, X, Y[, Z]), affine 4x4 RAS."""
    image = MetaTensor(torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32),
                       affine=torch.as_tensor(np.asarray(affine, dtype=np.float64)))
    return {"image": image, "modality": modality or "", "photometric": photometric or ""}


# ------------------------------------------------------------------------------- spatial dims
class MatchSpatialDims(Transform):
    """Bring one image to the pipeline's spatial_dims, or refuse it with a DataError naming the setting."""

    def __init__(self, spatial_dims: int, slices_from_3d: bool = False):
        self.spatial_dims, self.slices_from_3d = spatial_dims, slices_from_3d

    def __call__(self, img: MetaTensor) -> MetaTensor:
        rank = img.ndim - 1
        if rank == 3 and self.spatial_dims == 2 and img.shape[-1] == 1:
            img, rank = MetaTensor(img.as_tensor()[..., 0], affine=img.affine), 2   # (C, X, Y, 1) -> (C, X, Y)
        if self.spatial_dims == 3 and (rank == 2 or 1 in img.shape[1:]):
            raise DataError(f"a 2D image {tuple(img.shape[1:])} cannot enter a 3D pipeline",
                            where="preprocess.spatial_dims",
                            fix="use a 2D pipeline (spatial_dims: 2) for radiographs and single slices")
        if rank == 3 and self.spatial_dims == 2 and not self.slices_from_3d:
            raise DataError(f"a 3D volume {tuple(img.shape[1:])} cannot enter a 2D pipeline",
                            where="preprocess.slices_from_3d",
                            fix="set preprocess.slices_from_3d: true to train 2D models on axial slices")
        if rank not in (2, 3):
            raise DataError(f"image has {rank} spatial dimensions; only 2D and 3D are supported",
                            where="preprocess", fix="split 4D series (e.g. fMRI) into 3D volumes first")
        return _in_plane_frame(img) if rank == 2 else img


def _in_plane_frame(img: MetaTensor) -> MetaTensor:
    """2D: keep pixel order, keep only the pixel spacing (column norms) of the affine."""
    affine = torch.as_tensor(img.affine, dtype=torch.float64)
    frame = torch.eye(4, dtype=torch.float64)
    frame[0, 0], frame[1, 1] = affine[:3, 0].norm(), affine[:3, 1].norm()
    frame[:3, 3] = affine[:3, 3]
    return MetaTensor(img.as_tensor(), affine=frame)


class MatchSpatialDimsd(MapTransform):
    def __init__(self, keys: KeysCollection, spatial_dims: int, slices_from_3d: bool = False):
        super().__init__(keys)
        self.op = MatchSpatialDims(spatial_dims, slices_from_3d)

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.op(d[key])
        return d


# ------------------------------------------------------------------------------- intensity
PERCENTILE_SAMPLES = 262_144


class NormalizeModality(Transform):
    """Intensities to [0, 1] by modality (NORMALISERS); MONOCHROME1 images (bright = low value) are inverted
    so that bone is bright everywhere. CT is never inverted: HU are physical, the photometric tag only
    describes display."""

    def __init__(self, ct_window: Sequence[float] = (-1000.0, 1000.0),
                 mr_percentiles: Sequence[float] = (1.0, 99.0)):
        self.ct_window, self.mr_percentiles = tuple(ct_window), tuple(mr_percentiles)

    def __call__(self, img: torch.Tensor, modality: str = "", photometric: str = "") -> torch.Tensor:
        kind = NORMALISERS.get((modality or "").upper(), DEFAULT_NORMALISER)
        if kind == "window":
            low, high = self.ct_window
        elif kind == "percentiles":
            values = torch.as_tensor(img).detach().cpu().numpy().ravel()
            # a regular subsample of at most ~256k voxels: the percentiles move by far less than one grey
            # level, and the full sort was half of the cache stage's time on 128^3 volumes
            values = values[::max(1, values.size // PERCENTILE_SAMPLES)]
            low, high = (float(v) for v in np.percentile(values, self.mr_percentiles))
        else:
            low, high = float(img.min()), float(img.max())
        if high <= low:                      # a constant image carries no contrast: all background
            out = img * 0.0
        else:
            out = ((img.clamp(low, high) - low) / (high - low)).to(torch.float32)
        if kind != "window" and (photometric or "").upper() == "MONOCHROME1":
            out = 1.0 - out
        return out


class NormalizeModalityd(MapTransform):
    def __init__(self, keys: KeysCollection, ct_window: Sequence[float] = (-1000.0, 1000.0),
                 mr_percentiles: Sequence[float] = (1.0, 99.0)):
        super().__init__(keys)
        self.op = NormalizeModality(ct_window, mr_percentiles)

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.op(d[key], d.get("modality", ""), d.get("photometric", ""))
        return d


# ------------------------------------------------------------------------------- per-rank steps
class ByRankd(MapTransform):
    """Run the chain built for the image's own rank (a 2D pipeline may hold 3D volumes: slices_from_3d)."""

    def __init__(self, key: str, chains: dict[int, Compose]):
        super().__init__(key)
        self.key, self.chains = key, chains

    def __call__(self, data: dict) -> dict:
        return self.chains[data[self.key].ndim - 1](data)


def _per_rank(values: Sequence, rank: int, keep) -> list:
    """Settings written for the pipeline's dims, applied to an image of `rank` dims (`keep` = native)."""
    values = list(values)
    return values + [keep] * (rank - len(values))


def _geometry(cfg: PreprocessConfig, rank: int, keys: tuple[str, ...] = ("image",)) -> Compose:
    """keys beyond "image" are label maps (preprocess/masks.py): the same steps, nearest-neighbour."""
    modes = ["bilinear"] + ["nearest"] * (len(keys) - 1)
    steps = [Orientationd(list(keys), axcodes="RAS", labels=RAS_LABELS)] if rank == 3 else []
    if cfg.spacing is not None:   # non-positive pixdim keeps that axis' native spacing (MONAI convention)
        steps.append(Spacingd(list(keys), pixdim=_per_rank(cfg.spacing, rank, -1.0), mode=modes,
                              padding_mode="border", dtype=torch.float32))
    return Compose(steps)


def _above_background(x: torch.Tensor) -> torch.Tensor:
    return x > FOREGROUND_LEVEL


class Preprocess(Compose):
    """A Compose that lets a MedsslError raised by a step reach the caller as itself (MONAI wraps every
    failure in RuntimeError("applying transform ..."), which would hide the what/where/fix)."""

    def __call__(self, data, *args, **kwargs):
        try:
            return super().__call__(data, *args, **kwargs)
        except RuntimeError as err:
            cause = err
            while cause is not None and not isinstance(cause, MedsslError):
                cause = cause.__cause__
            if cause is None:
                raise
            raise cause from None


def build_preprocess(cfg: PreprocessConfig, label_key: str | None = None) -> Compose:
    """The whole chain for one pipeline's settings (see the module docstring for the order and why).
    `label_key`: a label map in the same dict goes through the same spatial steps, nearest-neighbour."""
    ranks = (2, 3) if cfg.spatial_dims == 2 else (3,)
    keys = ("image",) + ((label_key,) if label_key else ())
    steps = [MatchSpatialDimsd(list(keys), cfg.spatial_dims, cfg.slices_from_3d),
             ByRankd("image", {r: _geometry(cfg, r, keys) for r in ranks}),
             NormalizeModalityd("image", cfg.ct_window, cfg.mr_percentiles)]
    if cfg.foreground_crop:
        steps.append(CropForegroundd(list(keys), source_key="image", select_fn=_above_background,
                                     allow_smaller=True, start_coord_key=None, end_coord_key=None))
    if cfg.size is not None:      # -1 keeps the native length of the slice axis for slices_from_3d
        steps.append(ByRankd("image", {r: Compose([ResizeWithPadOrCropd(list(keys), _per_rank(cfg.size, r, -1))])
                                       for r in ranks}))
    return Preprocess(steps)
