"""Datasets that feed training from the preprocessing cache, and a resumable DataLoader.

The CPU side stays light on purpose: a sample is one random crop read from a memory-mapped cached array (only
the crop's bytes are read and cast to float32); every other random operation runs batched on the training
device (medssl/views.py).

Determinism: the crop of dataset index i depends only on (seed, epoch, i), drawn from its own numpy Generator,
so worker count, worker scheduling and resuming never change what a step sees. The epoch comes from
`set_epoch(e)` (loaders that build one DataLoader per epoch call it) or from a "virtual" index: index
i >= len(dataset) means image i % len in epoch i // len (what `make_loader` yields), so an image gets new crop
positions every epoch without any state in the worker processes.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from medssl.errors import DataError

PAIR_KINDS = (None, "patient", "study")
MAX_OPEN_MAPS = 4096     # open memory maps kept per worker (each holds a file mapping, not the data)


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) % 2**63 for k in keys])


class _CachedImages(Dataset):
    """Shared plumbing: ids -> memory maps, kept open per process (never pickled to workers)."""

    def __init__(self, cache, image_ids: Sequence[str]):
        self.cache, self.ids = cache, [str(i) for i in image_ids]
        if not self.ids:
            raise DataError("no images to train on", where="dataset image_ids",
                            fix="check the splits and that the cache stage finished")
        self.epoch, self._open = 0, {}

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _array(self, index: int) -> np.ndarray:
        if index not in self._open:
            if len(self._open) >= MAX_OPEN_MAPS:
                self._open.clear()
            self._open[index] = self.cache.get(self.ids[index])    # (C, *spatial) float16 memory map
        return self._open[index]

    def _where(self, i: int) -> tuple[int, int]:
        """(image index, epoch) of a possibly virtual dataset index."""
        return i % len(self.ids), self.epoch + i // len(self.ids)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_open"] = {}      # a pickled memmap would copy the whole array into every worker
        return state


class CropDataset(_CachedImages):
    """Random crops of cached images for pretraining: {"image": (C, *crop), "index": int} and, with `pair_by`,
    {"pair": (C, *crop), "pair_index": int}: a crop of another image of the same patient/study (MICLe-style
    positives) when there is one, else another crop of the same image.

    spatial_dims=2 with 3D cached volumes: a random axial slice (last axis after RAS orientation), then a 2D
    crop. Images smaller than the crop are zero-padded, centred (0 is background after normalisation), so
    small images still give full-size batches.
    """

    def __init__(self, cache, image_ids: Sequence[str], crop: Sequence[int], spatial_dims: int, seed: int,
                 pair_by: str | None = None, groups: Mapping[str, str] | None = None):
        super().__init__(cache, image_ids)
        if len(crop) != spatial_dims or any(int(c) < 1 for c in crop):
            raise DataError(f"crop {list(crop)} must be {spatial_dims} positive sizes (spatial_dims={spatial_dims})",
                            where="pretrain.crop", fix=f"give {spatial_dims} values, e.g. {[32] * spatial_dims}")
        if pair_by not in PAIR_KINDS:
            raise DataError(f"pair_by must be one of {PAIR_KINDS}, not {pair_by!r}", where="pair_by")
        if pair_by is not None and groups is None:
            raise DataError(f"pair_by='{pair_by}' needs groups {{image_id: {pair_by} id}}", where="pair_by",
                            fix=f"pass groups built from the manifest's {pair_by}_id column")
        self.crop, self.spatial_dims, self.seed = [int(c) for c in crop], spatial_dims, int(seed)
        self.pair_by = pair_by
        self.partners = _partners(self.ids, groups) if pair_by else None

    def __getitem__(self, i: int) -> dict:
        at = self.positions(i)
        out = {"image": self.crop_at(at["image_at"]), "index": at["index"]}
        if "pair_at" in at:
            out["pair"], out["pair_index"] = self.crop_at(at["pair_at"]), at["pair_index"]
        return out

    def positions(self, i: int) -> dict:
        """Where the crops of dataset index i lie, without reading them: {"image_at": (2 + nd,) int64 =
        [image index, axial slice or -1, start per axis], "index"} (+ "pair_at", "pair_index").
        The random draws are the crops' own, so positions and crops of one index always agree."""
        index, epoch = self._where(int(i))
        rng = _rng(self.seed, epoch, index)
        out = {"image_at": self._position(index, rng), "index": index}
        if self.partners is not None:
            others = self.partners[index]
            partner = int(others[rng.integers(len(others))]) if len(others) else index
            out["pair_at"], out["pair_index"] = self._position(partner, rng), partner
        return out

    def _position(self, index: int, rng: np.random.Generator) -> torch.Tensor:
        shape = self._array(index).shape                        # (C, *spatial): the memmap header only
        axial = -1
        if self.spatial_dims == 2 and len(shape) == 4:
            axial, shape = int(rng.integers(shape[-1])), shape[:-1]    # a random axial slice (last axis)
        if len(shape) - 1 != self.spatial_dims:
            raise DataError(f"cached image {self.ids[index]} has {len(shape) - 1} spatial dims, the model wants "
                            f"{self.spatial_dims}", where="preprocess.spatial_dims / pretrain.crop",
                            fix="use the same spatial_dims for preprocessing and pretraining")
        starts = [int(rng.integers(max(s - c, 0) + 1)) for s, c in zip(shape[1:], self.crop)]
        return torch.tensor([index, axial, *starts], dtype=torch.int64)

    def crop_at(self, at: torch.Tensor) -> torch.Tensor:
        """The (C, *crop) float32 crop at a position from `positions`, zero-padded (centred) where the image
        is smaller than the crop."""
        index, axial, *starts = (int(v) for v in at)
        volume = self._array(index)                             # (C, *spatial), memory-mapped
        if axial >= 0:
            volume = volume[..., axial]
        region = volume[(slice(None), *(slice(a, a + c) for a, c in zip(starts, self.crop)))]
        return torch.from_numpy(_pad_to(np.ascontiguousarray(region, dtype=np.float32), self.crop))


class CropPositions(Dataset):
    """The positions of a CropDataset's crops (see CropDataset.positions), for training whose images live on
    the device (medssl.data.device_crops): a worker then moves a few integers instead of crop voxels."""

    def __init__(self, crops: CropDataset):
        self.crops = crops

    def __len__(self) -> int:
        return len(self.crops)

    def set_epoch(self, epoch: int) -> None:
        self.crops.set_epoch(epoch)

    def __getitem__(self, i: int) -> dict:
        return self.crops.positions(i)


def _pad_to(array: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Zero-pad (C, *spatial) up to `size`, the image centred. No-op when it already fits."""
    missing = [max(c - s, 0) for s, c in zip(array.shape[1:], size)]
    if not any(missing):
        return array
    return np.pad(array, [(0, 0)] + [(m // 2, m - m // 2) for m in missing])


def _partners(ids: list[str], groups: Mapping[str, str]) -> list[np.ndarray]:
    """For each index, the indices of the OTHER images in its group (ids absent from `groups` stand alone)."""
    members: dict[str, list[int]] = {}
    for index, image_id in enumerate(ids):
        members.setdefault(str(groups.get(image_id, f"alone:{image_id}")), []).append(index)
    key = [str(groups.get(image_id, f"alone:{image_id}")) for image_id in ids]
    return [np.array([j for j in members[key[i]] if j != i], dtype=np.int64) for i in range(len(ids))]


class ImageDataset(_CachedImages):
    """Whole preprocessed images with labels, for fine-tuning and evaluation:
    {"image": (C, *size) float32, "label": int, "image_id": str}. Batching needs equal shapes: set
    `preprocess.size`. spatial_dims=2 with 3D cached volumes gives the central axial slice; 3 (or None) gives
    the cached array whole (what a slice-pooled 2D model reads, models/slices.py)."""

    def __init__(self, cache, image_ids: Sequence[str], labels: Mapping[str, int] | Sequence[int],
                 spatial_dims: int | None = None):
        super().__init__(cache, image_ids)
        if isinstance(labels, Mapping):
            labels = [labels.get(i) for i in self.ids]
        if len(labels) != len(self.ids):
            raise DataError(f"{len(labels)} labels for {len(self.ids)} images", where="ImageDataset labels")
        missing = [i for i, v in zip(self.ids, labels) if v is None or pd.isna(v)]
        if missing:
            raise DataError(f"{len(missing)} images have no label (e.g. {missing[0]})", where="ImageDataset",
                            fix="pass labelled images only (medssl.data.splits.labelled_ids)")
        self.labels, self.spatial_dims = [int(v) for v in labels], spatial_dims

    def __getitem__(self, i: int) -> dict:
        index, _ = self._where(int(i))
        volume = self._array(index)
        if self.spatial_dims == 2 and volume.ndim == 4:
            volume = volume[..., volume.shape[-1] // 2]
        image = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))     # (C, *size)
        return {"image": image, "label": self.labels[index], "image_id": self.ids[index]}


# ------------------------------------------------------------------------------- resumable loader
class StreamBatchSampler(Sampler):
    """Batches of consecutive positions of one index stream: epoch e contributes a permutation of range(n)
    drawn from (seed, e) (or range(n) unshuffled), offset by e * n (virtual indices, see module doc).
    `epochs=None` streams forever (step-based pretraining); a finite stream keeps its last, partial batch.
    Starting at `start_step` only computes where that step begins: no skipped sample is read."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, start_step: int = 0,
                 epochs: int | None = 1):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.start_step, self.epochs = start_step, epochs

    def _order(self, epoch: int) -> np.ndarray:
        order = _rng(self.seed, epoch, 101).permutation(self.n) if self.shuffle else np.arange(self.n)
        return order + epoch * self.n

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("an endless stream has no length")
        return max(0, -(-self.epochs * self.n // self.batch_size) - self.start_step)

    def __iter__(self):
        position = self.start_step * self.batch_size
        epoch, offset = divmod(position, self.n)
        batch: list[int] = []
        while self.epochs is None or epoch < self.epochs:
            for index in self._order(epoch)[offset:]:
                batch.append(int(index))
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
            epoch, offset = epoch + 1, 0
        if batch:
            yield batch


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, workers: int = 0,
                start_step: int = 0, epochs: int | None = 1) -> DataLoader:
    """A DataLoader whose batches are a pure function of (seed, epoch, step): `start_step=k` yields exactly
    the batches an uninterrupted run yields from step k on, whatever `workers` is. epochs=None: endless."""
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, not {batch_size}", where="batch_size")
    sampler = StreamBatchSampler(len(dataset), batch_size, shuffle, seed, start_step, epochs)
    # an explicit generator: DataLoader would otherwise draw worker seeds from (and advance) the global RNG
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                      generator=torch.Generator().manual_seed(int(seed) % 2**63),
                      pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)
