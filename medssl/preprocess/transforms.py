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
The rules themselves (dimensions, in-plane frame, intensity ranges) live in arrays.py, written once on numpy
arrays; the cache runs arrays.fast_chain instead of this chain when nothing is resampled or cropped.
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
from medssl.errors import MedsslError
from medssl.preprocess.arrays import RAS, image_rank, in_plane_frame, intensity_range, inverted, per_rank

FOREGROUND_LEVEL = 0.05   # of the [0, 1] range: above MR background noise, below any tissue in a CT window


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
        rank, squeeze = image_rank(tuple(img.shape[1:]), self.spatial_dims, self.slices_from_3d)  # arrays.py
        if squeeze:
            img = MetaTensor(img.as_tensor()[..., 0], affine=img.affine)   # (C, X, Y, 1) -> (C, X, Y)
        if rank == 3:
            return img
        frame = in_plane_frame(torch.as_tensor(img.affine, dtype=torch.float64).numpy())
        return MetaTensor(img.as_tensor(), affine=torch.as_tensor(frame))


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
class NormalizeModality(Transform):
    """Intensities to [0, 1] by modality; the range and the MONOCHROME1 inversion are decided by
    arrays.intensity_range / arrays.inverted (one rule for this chain and the numpy one)."""

    def __init__(self, ct_window: Sequence[float] = (-1000.0, 1000.0),
                 mr_percentiles: Sequence[float] = (1.0, 99.0)):
        self.ct_window, self.mr_percentiles = tuple(ct_window), tuple(mr_percentiles)

    def __call__(self, img: torch.Tensor, modality: str = "", photometric: str = "") -> torch.Tensor:
        values = torch.as_tensor(img).detach().cpu().numpy()
        kind, low, high = intensity_range(values, modality, self.ct_window, self.mr_percentiles)
        if high <= low:                      # a constant image carries no contrast: all background
            out = img * 0.0
        else:
            out = ((img.clamp(low, high) - low) / (high - low)).to(torch.float32)
        return 1.0 - out if inverted(kind, photometric) else out


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


def _geometry(cfg: PreprocessConfig, rank: int, keys: tuple[str, ...] = ("image",)) -> Compose:
    """keys beyond "image" are label maps (preprocess/masks.py): the same steps, nearest-neighbour."""
    modes = ["bilinear"] + ["nearest"] * (len(keys) - 1)
    steps = [Orientationd(list(keys), axcodes="RAS", labels=RAS)] if rank == 3 else []
    if cfg.spacing is not None:   # non-positive pixdim keeps that axis' native spacing (MONAI convention)
        steps.append(Spacingd(list(keys), pixdim=per_rank(cfg.spacing, rank, -1.0), mode=modes,
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
        steps.append(ByRankd("image", {r: Compose([ResizeWithPadOrCropd(list(keys), per_rank(cfg.size, r, -1))])
                                       for r in ranks}))
    return Preprocess(steps)
