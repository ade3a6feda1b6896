"""Crop / image datasets and the resumable loader, on a real cache built from nibabel's T1 (`anatomical.nii`)."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from medssl.config import PreprocessConfig
from medssl.preprocess.cache import VolumeCache
from medssl.train.loaders import CropDataset, ImageDataset, make_loader
from medssl.errors import DataError

T1 = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
PATIENTS = {"img-a1": "pat-a", "img-a2": "pat-a", "img-b1": "pat-b", "img-b2": "pat-b", "img-c1": "pat-c"}


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict:
    """Five real images (intensity/flip variants of the T1) for 3 patients, cached 3D and 2D (axial slices)."""
    root = tmp_path_factory.mktemp("images")
    img = nib.load(T1)
    data = np.asarray(img.dataobj, dtype=np.float32)
    rows = []
    for n, image_id in enumerate(PATIENTS):
        variant = data[::-1] if n % 2 else data * (1 + 0.3 * n)
        nib.save(nib.Nifti1Image(variant, img.affine), root / f"{image_id}.nii.gz")
        nib.save(nib.Nifti1Image(variant[:, :, 8 + n: 9 + n], img.affine), root / f"{image_id}-2d.nii.gz")
        rows.append({"image_id": image_id, "patient_id": PATIENTS[image_id], "format": "nifti",
                     "paths": f"{image_id}.nii.gz", "modality": "MR", "photometric": "MONOCHROME2"})
    df = pd.DataFrame(rows)
    df2d = df.assign(paths=df.paths.str.replace(".nii.gz", "-2d.nii.gz"))
    out = {}
    for name, cfg, frame in (("3d", PreprocessConfig(spacing=[2.0, 2.0, 2.0]), df),
                             ("2d", PreprocessConfig(spatial_dims=2), df2d),
                             ("slices", PreprocessConfig(spatial_dims=2, slices_from_3d=True), df)):
        cache = VolumeCache(root / "cache", cfg, root)
        assert cache.build(frame, root, workers=1) == {}
        out[name] = cache
    return out


IDS = list(PATIENTS)


@pytest.mark.parametrize("kind,crop,dims", [("3d", [16, 20, 12], 3), ("2d", [24, 16], 2), ("slices", [24, 16], 2)])
def test_crop_shapes_and_determinism(caches, kind, crop, dims):
    ds = CropDataset(caches[kind], IDS, crop, dims, seed=5)
    a, b = ds[3], CropDataset(caches[kind], IDS, crop, dims, seed=5)[3]
    assert a["image"].shape == (1, *crop) and a["image"].dtype == torch.float32 and a["index"] == 3
    assert a["image"].is_contiguous()
    assert torch.equal(a["image"], b["image"])                                      # same (seed, index)
    assert not torch.equal(a["image"], CropDataset(caches[kind], IDS, crop, dims, seed=6)[3]["image"])
    assert not torch.equal(a["image"], ds[3 + len(ds)]["image"])                     # next epoch: new crop
    ds.set_epoch(1)
    assert torch.equal(ds[3]["image"], CropDataset(caches[kind], IDS, crop, dims, seed=5)[3 + len(IDS)]["image"])


def test_crop_is_a_region_of_the_cached_image(caches):
    volume = np.asarray(caches["slices"].get("img-b1"), np.float32)               # (1, X, Y, Z)
    ds = CropDataset(caches["slices"], IDS, [20, 30], 2, seed=0)
    for i in range(2, 2 + 4 * len(IDS), len(IDS)):                                  # image 2 across epochs
        crop = ds[i]["image"].numpy()[0]
        hits = [(x, y, z) for z in range(volume.shape[3]) for x in range(volume.shape[1] - 19)
                for y in range(volume.shape[2] - 29) if np.array_equal(volume[0, x:x + 20, y:y + 30, z], crop)]
        assert hits, "a 2D crop must be an axial-slice window of the volume"


def test_small_images_are_padded_centred_with_background(caches):
    shape = caches["2d"].shape("img-a1")[1:]                                        # (33, 41)
    ds = CropDataset(caches["2d"], IDS, [shape[0] + 7, 41], 2, seed=0)
    out = ds[0]["image"][0].numpy()
    assert out.shape == (shape[0] + 7, 41)
    assert np.all(out[:3] == 0) and np.all(out[-4:] == 0)                         # 7 rows: 3 before, 4 after
    np.testing.assert_array_equal(out[3:-4], np.asarray(caches["2d"].get("img-a1"), np.float32)[0])


def test_wrong_crop_dims_names_the_setting(caches):
    with pytest.raises(DataError, match="pretrain.crop"):
        CropDataset(caches["3d"], IDS, [16, 16], 3, seed=0)
    with pytest.raises(DataError, match="groups"):
        CropDataset(caches["3d"], IDS, [8, 8, 8], 3, seed=0, pair_by="patient")


def test_pairs_come_from_another_image_of_the_same_patient(caches):
    ds = CropDataset(caches["3d"], IDS, [8, 8, 8], 3, seed=1, pair_by="patient", groups=PATIENTS)
    for i in range(3 * len(IDS)):
        item = ds[i]
        me, partner = IDS[item["index"]], IDS[item["pair_index"]]
        assert item["pair"].shape == item["image"].shape == (1, 8, 8, 8)
        if me == "img-c1":                                   # alone: two crops of the same image
            assert partner == me
        else:
            assert partner != me and PATIENTS[partner] == PATIENTS[me]


def _batches(loader) -> list[list[int]]:
    return [b["index"].tolist() for b in loader]


def test_resume_equals_uninterrupted_and_reads_nothing_skipped(caches, monkeypatch):
    ds = CropDataset(caches["3d"], IDS, [8, 8, 8], 3, seed=2)
    full = list(make_loader(ds, 2, shuffle=True, seed=7, workers=0, epochs=3))
    assert len(full) == 8 and len(full[-1]["index"]) == 1                           # 15 samples in 2s
    assert sorted(sum((b["index"].tolist() for b in full[:3]), [])[:5]) == list(range(5))   # an epoch = each once
    reads = []
    original = CropDataset.__getitem__
    monkeypatch.setattr(CropDataset, "__getitem__", lambda self, i: reads.append(i) or original(self, i))
    resumed = list(make_loader(ds, 2, shuffle=True, seed=7, workers=0, start_step=3, epochs=3))
    assert len(reads) == 15 - 6                                                      # skipped samples unread
    for got, want in zip(resumed, full[3:], strict=True):
        assert torch.equal(got["image"], want["image"]) and torch.equal(got["index"], want["index"])
    assert _batches(make_loader(ds, 2, shuffle=True, seed=8, workers=0)) != _batches(full[:3])


def test_worker_processes_give_the_same_batches(caches):
    ds = CropDataset(caches["slices"], IDS, [16, 16], 2, seed=3)
    endless = make_loader(ds, 4, shuffle=True, seed=1, workers=2, start_step=2, epochs=None)
    got = [b for _, b in zip(range(3), endless)]
    want = list(make_loader(ds, 4, shuffle=True, seed=1, workers=0, epochs=4))[2:5]
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g["image"], w["image"])


def test_image_dataset_whole_images_and_labels(caches):
    labels = {i: n % 2 for n, i in enumerate(IDS)}
    ds = ImageDataset(caches["3d"], IDS, labels)
    item = ds[1]
    assert item["image"].shape == caches["3d"].shape("img-a2") and item["label"] == 1
    assert item["image_id"] == "img-a2"
    sliced = ImageDataset(caches["slices"], IDS, list(labels.values()), spatial_dims=2)
    assert sliced[0]["image"].ndim == 3                                              # (C, X, Y) central slice
    batch = next(iter(make_loader(sliced, 5, shuffle=False, seed=0)))
    assert batch["label"].tolist() == [0, 1, 0, 1, 0] and batch["image_id"] == IDS
    with pytest.raises(DataError, match="no label"):
        ImageDataset(caches["3d"], IDS, {"img-a1": 0})
