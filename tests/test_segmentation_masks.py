"""Masks as labels: the manifest checks each mask's geometry against its image (same grid, another grid over
the same anatomy, no overlap, a 2D mask for a 3D image, unreadable, empty) and the mask cache puts masks
through the image's own spatial chain. Real anatomy: nibabel's anatomical.nii (T1, (33, 41, 25))."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nibabel.testing import data_path

from medssl.config import PreprocessConfig
from medssl.ingest.manifest import build_manifest, read_manifest
from medssl.ingest.masks import read_mask
from medssl.preprocess.cache import VolumeCache
from medssl.preprocess.masks import MaskCache, preprocess_pair


def _t1() -> nib.Nifti1Image:
    return nib.load(Path(data_path) / "anatomical.nii")


def _lesion(volume: np.ndarray) -> np.ndarray:
    mask = np.zeros(volume.shape, np.uint8)
    mask[10:18, 12:22, 8:14] = 1       # a box of 480 voxels
    mask[12:15, 14:18, 9:12] = 2       # a core inside it
    return mask


@pytest.fixture()
def cohort(tmp_path):
    """Six NIfTI images (one per patient) and their masks, each mask a different case."""
    t1 = _t1()
    volume = np.asarray(t1.dataobj, np.float32)
    images, masks = tmp_path / "images", tmp_path / "masks"
    masks.mkdir()
    lesion = _lesion(volume)
    cases = {
        "same": nib.Nifti1Image(lesion, t1.affine),
        "flipped": _flipped(lesion, t1.affine),                      # same anatomy, x stored reversed
        "away": nib.Nifti1Image(lesion, t1.affine @ _shift(500.0)),  # half a metre off: covers nothing
        "slice": nib.Nifti1Image(lesion[:, :, 10:11], t1.affine),    # one slice of a 3D image
        "empty": nib.Nifti1Image(np.zeros_like(lesion), t1.affine),
        "broken": None,
    }
    rows = []
    for name, mask in cases.items():
        (images / f"sub-{name}").mkdir(parents=True)
        nib.save(nib.Nifti1Image(volume, t1.affine), images / f"sub-{name}" / "t1.nii.gz")
        path = masks / f"{name}.nii.gz"
        if mask is None:
            path.write_bytes(b"not a nifti file")
        else:
            nib.save(mask, path)
        rows.append({"path": f"sub-{name}/t1.nii.gz", "mask": f"masks/{name}.nii.gz"})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    return tmp_path


def _flipped(mask: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    out = affine.copy()
    out[:3, 0] *= -1
    out[:3, 3] = affine[:3, :3] @ [mask.shape[0] - 1, 0, 0] + affine[:3, 3]
    return nib.Nifti1Image(np.ascontiguousarray(mask[::-1]), out)


def _shift(mm: float) -> np.ndarray:
    shift = np.eye(4)
    shift[0, 3] = mm
    return shift


def _manifest(cohort: Path) -> pd.DataFrame:
    build_manifest(cohort / "images", cohort / "m.csv", labels=cohort / "labels.csv", progress=False, workers=1)
    df, meta = read_manifest(cohort / "m.csv")
    assert "has_mask" in meta["label_columns"]
    return df.assign(case=df["paths"].str.extract(r"sub-(\w+)/")[0]).set_index("case")


def test_manifest_checks_mask_geometry(cohort):
    df = _manifest(cohort)
    assert sorted(df.index) == ["away", "broken", "empty", "flipped", "same", "slice"]   # masks are not images
    assert df.loc["same", "mask_grid"] == "same" and df.loc["same", "mask_labels"] == "0|1|2"
    assert df.loc["same", "has_mask"] == 1 and df.loc["same", "problems"] == ""
    assert df.loc["flipped", "mask_grid"] == "resampled" and df.loc["flipped", "mask"] == "../masks/flipped.nii.gz"
    assert df.loc["empty", "has_mask"] == 0 and df.loc["empty", "mask_labels"] == "0"
    assert "empty (no foreground voxel)" in df.loc["empty", "problems"] and df.loc["empty", "mask"] != ""
    for case, reason in (("away", "does not cover the image"), ("slice", "2D mask"), ("broken", "unreadable")):
        assert reason in df.loc[case, "problems"], case
        assert df.loc[case, "mask"] == "" and pd.isna(df.loc[case, "has_mask"])


def test_mask_cache_follows_the_image_chain(cohort, tmp_path):
    df = _manifest(cohort)
    cfg = PreprocessConfig(spacing=[2.0, 2.0, 2.0], size=[24, 24, 16], cache_dir=tmp_path / "cache")
    images = VolumeCache(cfg.cache_dir, cfg, cohort / "images")
    assert images.build(df.reset_index(), cohort / "images", workers=1) == {}
    masks = MaskCache(images)
    failures = masks.build(df.reset_index(), cohort / "images")
    assert failures == {}
    same, flipped = (df.loc[c, "image_id"] for c in ("same", "flipped"))
    a, b = np.asarray(masks.get(same)), np.asarray(masks.get(flipped))
    assert a.shape == (1, 24, 24, 16) == tuple(images.shape(same))
    assert np.array_equal(a, b)                              # another grid over the same anatomy: same labels
    assert set(np.unique(a)) == {0, 1, 2}
    # nearest neighbour keeps volumes: 480 voxels of 1 mm^3 (box incl. core) at 2 mm voxels is 60 voxels
    t1 = _t1()
    voxel_ml = float(np.prod(t1.header.get_zooms()[:3]))
    assert (a > 0).sum() * 8.0 == pytest.approx(480 * voxel_ml, rel=0.35)
    assert masks.labels(same) == [0, 1, 2]
    # the image half of the paired chain is the cached image itself (one chain, not a copy of it)
    row = df.reset_index().set_index("image_id").loc[same].to_dict() | {"image_id": same}
    image, _ = preprocess_pair(row, cohort / "images", cfg)
    assert np.allclose(image, np.asarray(images.get(same), np.float32), atol=1e-3)


def test_dicom_seg_reads_with_highdicom():
    pytest.importorskip("highdicom")
    from pydicom.data import get_testdata_file
    array, affine = read_mask(get_testdata_file("liver_1frame.dcm"))
    assert array.shape == (1, 512, 512) and set(np.unique(array)) == {0, 1}
    assert affine.shape == (4, 4) and abs(abs(np.linalg.det(affine[:3, :3])) - 0.810547 ** 2) < 1e-3
