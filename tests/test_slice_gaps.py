"""Missing slices: a series with gaps is split into contiguous blocks, each at its true positions (checked against
the written truth and against dcm2niix run on each block's files); every affine runs from the first slice's
ImagePositionPatient to the last one's; a modality LUT is applied the way pydicom's apply_modality_lut does."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut

from medssl.demo.dicom_writer import write_series
from medssl.ingest.decode import load_image
from medssl.ingest.manifest import build_manifest, read_manifest

from dicom_cohorts import oblique_affine, real_volume, write_enhanced
from test_dicom_geometry import canonical, dcm2niix, needs_dcm2niix

pytestmark = pytest.mark.timeout(120)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def _manifest(folder: Path, tmp_path: Path):
    build_manifest(folder, tmp_path / "m.csv", salt="t", workers=1, progress=False)
    df, meta = read_manifest(tmp_path / "m.csv")
    skipped = pd.read_csv(tmp_path / "m.skipped.csv", dtype=str, keep_default_na=False)
    return df, Path(meta["root"]), dict(zip(skipped["path"], skipped["reason"]))


def _shifted(affine: np.ndarray, k0: int) -> np.ndarray:
    """The affine of a block whose first slice is slice k0 of the written volume."""
    out = affine.copy()
    out[:3, 3] = affine[:3, :3] @ [0, 0, k0] + affine[:3, 3]
    return out


def _assert_first_last_ipp(row, root: Path, affine: np.ndarray) -> None:
    """Voxel (0, 0, 0) sits at the first file's IPP and (0, 0, n-1) at the last one's."""
    paths = row["paths"].split("|")
    for k, path in ((0, paths[0]), (len(paths) - 1, paths[-1])):
        ipp = np.asarray(pydicom.dcmread(root / path).ImagePositionPatient, dtype=float)
        np.testing.assert_allclose(affine @ [0, 0, k, 1], [*(LPS_TO_RAS @ ipp), 1], atol=1e-4)


@needs_dcm2niix
def test_gap_series_split_into_blocks_at_true_positions(tmp_path: Path):
    vol, affine = real_volume()
    affine = oblique_affine(affine)
    folder = tmp_path / "dicom"
    paths = write_series(vol, affine, folder, patient_name="Gap^Test", patient_id="GAP-1")
    for k in (9, 10):
        paths[k].unlink()
    df, root, _ = _manifest(folder, tmp_path)
    assert sorted(df["shape"]) == ["33x41x14", "33x41x9"]
    assert df["series_id"].nunique() == 1 and df["image_id"].nunique() == 2
    for _, row in df.iterrows():
        assert "split into 2 contiguous blocks" in row["problems"]
        loaded = load_image(row, root)
        _assert_first_last_ipp(row, root, loaded.affine)
        k0 = 0 if row["n_files"] == 9 else 11
        ours, ours_affine = canonical(loaded.array[0], loaded.affine)
        truth, truth_affine = canonical(vol[:, :, k0:k0 + row["n_files"]], _shifted(affine, k0))
        np.testing.assert_array_equal(ours, truth)
        np.testing.assert_allclose(ours_affine, truth_affine, atol=1e-3)
        block = tmp_path / f"block{k0}"  # dcm2niix's answer for the same files alone
        block.mkdir()
        for path in row["paths"].split("|"):
            shutil.copy(root / path, block / Path(path).name)
        judge = dcm2niix(block, tmp_path / f"nii{k0}")
        theirs, theirs_affine = canonical(judge.get_fdata(dtype=np.float32), judge.affine)
        np.testing.assert_array_equal(ours, theirs)
        np.testing.assert_allclose(ours_affine, theirs_affine, atol=1e-3)


def test_lone_slice_between_gaps_is_reported(tmp_path: Path):
    vol, affine = real_volume()
    paths = write_series(vol[:, :, :8], affine, tmp_path / "d", patient_name="A^B", patient_id="X")
    for k in (1, 3):
        paths[k].unlink()
    df, _, skipped = _manifest(tmp_path / "d", tmp_path)
    assert sorted(df["n_files"]) == [4]  # slices 4..7; slice 0 alone before the first gap
    lone = {p for p, r in skipped.items() if r.startswith("missing slices: lone slice")}
    assert lone == {str(paths[0].relative_to(tmp_path / "d")), str(paths[2].relative_to(tmp_path / "d"))}


def test_uneven_series_affine_meets_first_and_last_ipp(tmp_path: Path):
    vol, affine = real_volume()
    paths = write_series(vol[:, :, :8], oblique_affine(affine), tmp_path / "d", patient_name="A^B", patient_id="X")
    ds = pydicom.dcmread(paths[7])
    ds.ImagePositionPatient = [float(v) + 0.5 for v in ds.ImagePositionPatient]  # last slice off the grid
    ds.save_as(paths[7], enforce_file_format=True)
    df, root, _ = _manifest(tmp_path / "d", tmp_path)
    row = df.iloc[0]
    assert "uneven slice spacing" in row["problems"] and "from the uniform grid" in row["problems"]
    _assert_first_last_ipp(row, root, load_image(row, root).affine)


def test_multiframe_with_missing_frames_keeps_largest_block(tmp_path: Path):
    vol, affine = real_volume()
    order = np.random.default_rng(0).permutation(25)
    path = write_enhanced(vol, affine, tmp_path / "d" / "mf.dcm", patient_id="E-1", frame_order=order)
    ds = pydicom.dcmread(path)  # drop the frames of slices 9 and 10 (stored out of order)
    keep = [f for f, k in enumerate(order) if k not in (9, 10)]
    ds.PerFrameFunctionalGroupsSequence = [ds.PerFrameFunctionalGroupsSequence[f] for f in keep]
    ds.PixelData = ds.pixel_array[keep].astype("<i2").tobytes()
    ds.NumberOfFrames = len(keep)
    ds.save_as(path, enforce_file_format=True)
    df, root, _ = _manifest(tmp_path / "d", tmp_path)
    row = df.iloc[0]
    assert row["shape"] == "33x41x14" and "the other 9 frame(s) are not used" in row["problems"]
    loaded = load_image(row, root)
    ours, ours_affine = canonical(loaded.array[0], loaded.affine)
    truth, truth_affine = canonical(vol[:, :, 11:], _shifted(affine, 11))
    np.testing.assert_array_equal(ours, truth)
    np.testing.assert_allclose(ours_affine, truth_affine, atol=1e-3)


def test_modality_lut_sequence_applied(tmp_path: Path):
    """pydicom's mlut_18.dcm: values through its Modality LUT Sequence, not the raw stored values."""
    source = Path(get_testdata_file("mlut_18.dcm"))
    (tmp_path / "d").mkdir()
    shutil.copy(source, tmp_path / "d" / source.name)
    df, root, _ = _manifest(tmp_path / "d", tmp_path)
    loaded = load_image(df.iloc[0], root)
    ds = pydicom.dcmread(source)
    expected = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)  # (rows, columns)
    assert not np.array_equal(expected, ds.pixel_array)
    np.testing.assert_array_equal(loaded.array[0], expected.T)
