"""The mask cache: each manifest mask through the SAME spatial chain as its image, nearest-neighbour, once.

The image and its mask go through one call of the image chain (transforms.build_preprocess with a label
key: orientation, spacing, foreground crop decided on the image, pad/crop), so they cannot disagree on a
voxel. A mask whose manifest `mask_grid` is "resampled" is first put onto the image's own grid (MONAI
ResampleToMatch, nearest). Layout: `<image cache dir>/masks/<image_id>.npy` (uint8, (1, *spatial), the
image's cached shape) and `index.json` with the source fingerprints of image and mask; keyed like the image
cache (its settings directory), so changed preprocessing settings never reuse old masks.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from medssl.config import PreprocessConfig
from medssl.errors import DataError, MedsslError
from medssl.preprocess.cache import VolumeCache, source_fingerprint

MASK_DTYPE = np.uint8   # up to 255 classes


def preprocess_pair(row: dict, root: Path, cfg: PreprocessConfig, chain=None) -> tuple[np.ndarray, np.ndarray]:
    """(image (C, *spatial) float32, mask (1, *spatial) uint8) after the image chain."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import ResampleToMatch
    from medssl.ingest.decode import load_image
    from medssl.ingest.masks import read_mask
    from medssl.preprocess.transforms import build_preprocess, make_input
    loaded = load_image(row, root)
    data = make_input(loaded.array, loaded.affine, loaded.modality, loaded.photometric)
    array, affine = read_mask(Path(root) / row["mask"])
    while array.ndim > data["image"].ndim - 1 and array.shape[-1] == 1:   # (X, Y, 1) mask of a 2D image
        array = array[..., 0]
    label = MetaTensor(torch.as_tensor(array[None], dtype=torch.float32), affine=torch.as_tensor(affine))
    if row.get("mask_grid") == "resampled":
        label = ResampleToMatch(mode="nearest", padding_mode="zeros")(label, img_dst=data["image"])
    if tuple(label.shape[1:]) != tuple(data["image"].shape[1:]):
        raise DataError(f"mask {tuple(label.shape[1:])} and image {tuple(data['image'].shape[1:])} differ in shape",
                        where=str(row["mask"]), fix="rebuild the manifest (it checks mask geometry)")
    out = (chain or build_preprocess(cfg, label_key="label"))({**data, "label": label})
    mask = np.rint(out["label"].detach().cpu().numpy())
    return out["image"].detach().cpu().numpy(), mask.astype(MASK_DTYPE)


class MaskCache:
    """Preprocessed masks beside an image cache; `load` replaces decode.load_image in tests."""

    def __init__(self, images: VolumeCache):
        self.images, self.cfg = images, images.cfg
        self.dir = images.dir / "masks"
        self.dir.mkdir(parents=True, exist_ok=True)
        index = self.dir / "index.json"
        self._index = json.loads(index.read_text()) if index.is_file() else {}

    def path(self, image_id: str) -> Path:
        return self.dir / f"{image_id}.npy"

    def has(self, image_id: str) -> bool:
        return image_id in self._index and self.path(image_id).is_file()

    def get(self, image_id: str) -> np.ndarray:
        """(1, *spatial) uint8, read-only memory map."""
        if not self.has(image_id):
            raise DataError(f"mask of image {image_id} is not in the mask cache", where=str(self.dir),
                            fix="run the segmentation stage again (it builds the mask cache)")
        return np.load(self.path(image_id), mmap_mode="r")

    def build(self, df: pd.DataFrame, root: Path | str) -> dict[str, str]:
        """Cache every row with a mask (rebuilt when the image or mask file changed); {image_id: reason} of
        the ones that failed, never raising for one bad pair."""
        from medssl.preprocess.transforms import build_preprocess
        chain, failures = build_preprocess(self.cfg, label_key="label"), {}
        for row in df[df["mask"].fillna("").astype(str) != ""].to_dict("records"):
            image_id = str(row["image_id"])
            try:
                source = source_fingerprint(row, Path(root)) + source_fingerprint({"paths": row["mask"]}, Path(root))
                if self._index.get(image_id, {}).get("source") == source and self.path(image_id).is_file():
                    continue
                self._store(image_id, source, *preprocess_pair(row, Path(root), self.cfg, chain))
            except (MedsslError, OSError, ValueError, RuntimeError) as err:
                failures[image_id] = getattr(err, "what", None) or f"{type(err).__name__}: {err}"
                self._index.pop(image_id, None)
        tmp = self.dir / "index.json.tmp"
        tmp.write_text(json.dumps(self._index, sort_keys=True))
        tmp.replace(self.dir / "index.json")
        return failures

    def _store(self, image_id: str, source: list, image: np.ndarray, mask: np.ndarray) -> None:
        if self.images.has(image_id) and tuple(self.images.shape(image_id)) != tuple(image.shape):
            raise DataError(f"mask chain gave shape {image.shape[1:]} but the cached image is "
                            f"{self.images.shape(image_id)[1:]}", where=image_id, fix="rerun the cache stage")
        tmp = str(self.path(image_id)) + ".tmp.npy"
        np.save(tmp, mask)
        os.replace(tmp, self.path(image_id))
        self._index[image_id] = {"source": source, "shape": list(mask.shape),
                                 "labels": [int(v) for v in np.unique(mask)]}

    def labels(self, image_id: str) -> list[int]:
        return list(self._index[image_id]["labels"])
