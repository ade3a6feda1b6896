"""Training images held on the training device, crops cut there: the data path of a GPU that eats 96^3 crops
faster than any CPU can copy them.

    bank = DeviceCrops.load(cache, image_ids, crop, spatial_dims, device)
    batch = bank.fill(move_to_device(batch_of_positions, device))   # {"image_at": (B, 2+nd)} -> {"image": ...}

A 3D MAE step on one H200 consumes thousands of 96^3 crops a second (../../shared/ANCHORS.md): as float32
that is >10 GB/s of crops through worker processes, shared memory, pinning and PCIe. Instead every cached
image (float16, as in the cache) is copied to the device once, into one zero-padded frame
(N, C, *frame), and a batch of crops is ONE gather kernel driven by the integer positions that
CropDataset.positions draws. The positions come from the very same random draws as the CPU crops, so a run
with images on the device sees bit-identical crops (and resumes at the same point) as one without.

Frame layout: along each axis the frame is max(largest image, crop) long; an image smaller than the crop is
placed at offset (crop - size) // 2 (zero padding around it, centred: CropDataset's padding), every other
image at 0. Then a crop at start s (0 on an axis where the image is smaller) is frame[i, :, s : s + crop]
along every axis: the padded crop, with no per-image bookkeeping.
"""
from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np
import torch

from medssl.ui import progress_bar
from medssl.errors import DataError
from medssl.augment.views import gather_windows
from medssl.ui import console

BYTES_PER_VOXEL = 2          # float16, as cached
AUTO_SHARE = 0.4             # "auto" keeps images on the GPU when they take at most this share of free memory


def _image_shape(cache, image_id: str) -> tuple[int, ...]:
    """(C, *spatial) of a cached image: from the cache index when it has one (no file opened)."""
    shape = cache.shape(image_id) if hasattr(cache, "shape") else cache.get(image_id).shape
    return tuple(int(s) for s in shape)


def _shapes(cache, image_ids: Sequence[str], spatial_dims: int) -> list[tuple[int, ...]]:
    shapes = [_image_shape(cache, i) for i in image_ids]
    dims = {len(s) - 1 for s in shapes}
    if len(dims) != 1 or dims.pop() not in (spatial_dims, spatial_dims + 1):
        raise DataError(f"the cached images have {sorted({len(s) - 1 for s in shapes})} spatial dims; "
                        f"{spatial_dims}D crops need {spatial_dims} (or {spatial_dims + 1}: slices) for all of them",
                        where="preprocess.spatial_dims / pretrain.crop",
                        fix="use the same spatial_dims for preprocessing and pretraining")
    return shapes


def frame_layout(shapes: Sequence[tuple[int, ...]], crop: Sequence[int]) -> tuple[list[int], np.ndarray]:
    """(frame size per spatial axis, offsets (N, nd_crop)) for images of `shapes` (C, *spatial).

    For 2D crops of 3D volumes the last (axial) axis is kept whole: it is indexed by slice, never cropped.
    """
    nd = len(crop)
    spatial = np.array([s[1:] for s in shapes], dtype=np.int64)           # (N, nd or nd + 1)
    cropped = spatial[:, :nd]
    frame = np.maximum(cropped.max(0), np.asarray(crop, dtype=np.int64)).tolist()
    frame += spatial[:, nd:].max(0).tolist()                               # the axial axis, if any
    offsets = np.maximum(np.asarray(crop, dtype=np.int64) - cropped, 0) // 2
    return [int(f) for f in frame], offsets


def bank_bytes(cache, image_ids: Sequence[str], crop: Sequence[int], spatial_dims: int) -> int:
    shapes = _shapes(cache, image_ids, spatial_dims)
    frame, _ = frame_layout(shapes, crop)
    channels = max(s[0] for s in shapes)
    return len(shapes) * channels * math.prod(frame) * BYTES_PER_VOXEL


def use_device_crops(setting: str, cache, image_ids: Sequence[str], crop: Sequence[int], spatial_dims: int,
                     device: torch.device) -> bool:
    """Decide train.device_crops: "on", "off", or "auto" (CUDA and the images fit in AUTO_SHARE of free memory)."""
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return False
    need = bank_bytes(cache, image_ids, crop, spatial_dims)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if setting == "auto" and need > AUTO_SHARE * free:
            console.print(f"training images ({need / 2**30:.1f} GiB as float16) exceed {AUTO_SHARE:.0%} of the "
                          f"GPU's free memory ({free / 2**30:.1f} GiB): crops are cut on the CPU instead")
            return False
        if need > free:
            raise DataError(f"the training images need {need / 2**30:.1f} GiB on {device}, "
                            f"{free / 2**30:.1f} GiB are free", where="pretrain.train.device_crops: on",
                            fix="use device_crops: auto (crops cut on the CPU when the images do not fit)")
    return True


def device_crop_workers(workers: int, device: torch.device) -> int:
    """Loader processes for crop positions: drawing a batch's positions takes ~30 us a sample (its own random
    generator), milliseconds per batch that a GPU would wait for in the main process; one worker draws the
    next batch during the step. On the CPU the configured count stands (0: no extra process)."""
    return max(1, workers) if device.type == "cuda" else workers


class DeviceCrops:
    """All training images in one device tensor; batches of crops gathered from integer positions."""

    def __init__(self, frame: torch.Tensor, crop: Sequence[int]):
        self.frame, self.crop = frame, [int(c) for c in crop]
        self.nd = len(self.crop)
        device = frame.device
        self._ranges = [torch.arange(c, device=device) for c in self.crop]

    @classmethod
    def load(cls, cache, image_ids: Sequence[str], crop: Sequence[int], spatial_dims: int,
             device: torch.device | str) -> "DeviceCrops":
        """Copy the cached images (in `image_ids` order: CropDataset's indices) to `device`."""
        device, start = torch.device(device), time.perf_counter()
        shapes = _shapes(cache, image_ids, spatial_dims)
        if len(crop) != spatial_dims:
            raise DataError(f"crop {list(crop)} must have {spatial_dims} sizes", where="pretrain.crop")
        frame_size, offsets = frame_layout(shapes, crop)
        channels = max(s[0] for s in shapes)
        frame = torch.zeros(len(shapes), channels, *frame_size, dtype=torch.float16, device=device)
        with progress_bar("images") as bar:   # reading tens of GB from the cache takes a while: show it
            task = bar.add_task(f"images to {device}", total=len(shapes))
            for n, (image_id, shape) in enumerate(zip(image_ids, shapes)):
                array = torch.from_numpy(np.ascontiguousarray(cache.get(image_id), dtype=np.float16))
                place = (n, slice(0, shape[0]), *(slice(int(o), int(o) + s) for o, s in
                                                  zip(list(offsets[n]) + [0], shape[1:])))
                frame[place] = array.to(device, non_blocking=False)
                bar.advance(task)
        size = frame.numel() * BYTES_PER_VOXEL / 2**30
        console.print(f"{len(shapes)} training images on {device} ({size:.2f} GiB, "
                      f"{time.perf_counter() - start:.1f} s): crops are cut there")
        return cls(frame, crop)

    def gather(self, at: torch.Tensor) -> torch.Tensor:
        """(B, 2 + nd) positions [image, axial slice or -1, starts] -> (B, C, *crop) float32, one gather."""
        at = at.to(self.frame.device)
        along = [at[:, 2 + axis, None] + self._ranges[axis] for axis in range(self.nd)]  # frame = padded crop
        axial = at[:, 1] if self.frame.ndim == 3 + self.nd else None  # 2D crops of 3D volumes: the slice
        return gather_windows(self.frame, at[:, 0], along, axial).float()

    def fill(self, batch: dict) -> dict:
        """Replace the positions in a batch by the crops they point at ("image_at" -> "image", "pair_at" -> "pair")."""
        out = {k: v for k, v in batch.items() if not k.endswith("_at")}
        out["image"] = self.gather(batch["image_at"])
        if "pair_at" in batch:
            out["pair"] = self.gather(batch["pair_at"])
        return out
