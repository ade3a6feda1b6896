"""Bad input never crashes the indexer and never costs the good images next to it: each case becomes a
skipped entry with a reason, a flagged row, or a DataError that names the file, column and row."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file

import medssl.ingest.listing as listing
import medssl.ingest.scan as scan
from medssl.demo.dicom_writer import write_series
from medssl.ingest.decode import load_image
from medssl.ingest.labels import read_labels
from medssl.ingest.manifest import build_manifest, read_manifest
from medssl.errors import DataError

from dicom_cohorts import real_volume

pytestmark = pytest.mark.timeout(60)


def _good_series(folder: Path) -> list[Path]:
    vol, affine = real_volume()
    return write_series(vol[:, :, :4], affine, folder, patient_name="Good^Series", patient_id="GOOD-1")


def _skipped(out: Path) -> dict[str, str]:
    table = pd.read_csv(out.with_suffix(".skipped.csv"), dtype=str, keep_default_na=False)
    return dict(zip(table["path"], table["reason"]))


@pytest.fixture()
def bad_folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    good = _good_series(root / "good")
    bad = root / "bad"
    bad.mkdir()
    (bad / "zero.dcm").write_bytes(b"")
    data = good[0].read_bytes()
    (bad / "truncated.dcm").write_bytes(data[: len(data) - 500])
    (bad / "corrupt.dcm").write_bytes(b"\0" * 128 + b"DICM" + np.random.default_rng(0).bytes(3000))
    ds = pydicom.dcmread(good[1])
    del ds.PixelData
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(bad / "nopixels.dcm", enforce_file_format=True)
    huge = pydicom.dcmread(good[2])
    huge.Rows, huge.Columns, huge.NumberOfFrames = 65535, 65535, 1000
    huge.SOPInstanceUID, huge.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    huge.save_as(bad / "huge_header.dcm", enforce_file_format=True)
    (bad / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    (bad / "notes.txt").write_text("patient list\n")
    (bad / "fake.nii").write_bytes(b"\0" * 400)
    vol, affine = real_volume()
    nan = vol.astype(np.float32)
    nan[0, 0, :3], nan[1, 1, 1] = np.nan, np.inf
    nib.save(nib.Nifti1Image(nan, affine), root / "nan.nii.gz")
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), np.nan, np.float32), affine), bad / "allnan.nii.gz")
    return root


def test_bad_files_are_skipped_good_ones_kept(bad_folder: Path, tmp_path: Path):
    out = tmp_path / "m.csv"
    summary = build_manifest(bad_folder, out, salt="s", workers=1, progress=False)
    df, _ = read_manifest(out)
    assert sorted(df["format"]) == ["dicom-series", "nifti"]
    assert df.loc[df["format"] == "dicom-series", "shape"].item() == "33x41x4"
    skipped = _skipped(out)
    expected = {"bad/zero.dcm": "empty file", "bad/truncated.dcm": "truncated", "bad/corrupt.dcm": "unreadable",
                "bad/nopixels.dcm": "no pixel data", "bad/huge_header.dcm": "too large",
                "bad/photo.png": "unreadable", "bad/notes.txt": "not an image", "bad/fake.nii": "unreadable NIfTI",
                "bad/allnan.nii.gz": "unreadable"}
    for path, category in expected.items():
        assert skipped[path].startswith(category), (path, skipped[path])
    assert "max_image_mb" in skipped["bad/huge_header.dcm"]
    assert "no finite voxel" in skipped["bad/allnan.nii.gz"]
    assert summary.n_images == 2 and sum(summary.skipped_by_reason.values()) == len(expected)


def test_series_too_large_once_loaded(tmp_path: Path):
    """Each 33x41 slice is tiny, but the series must fit max_image_mb as the float32 volume load_image makes."""
    _good_series(tmp_path / "data")
    build_manifest(tmp_path / "data", tmp_path / "m.csv", salt="s", workers=1, progress=False, max_image_mb=0.01)
    assert len(read_manifest(tmp_path / "m.csv")[0]) == 0
    reasons = set(_skipped(tmp_path / "m.csv").values())
    assert len(reasons) == 1 and reasons.pop().startswith("too large: dicom-series of 4 file(s)")


def test_nan_nifti_flagged_and_cleaned(bad_folder: Path, tmp_path: Path):
    build_manifest(bad_folder, tmp_path / "m.csv", salt="s", workers=1, progress=False)
    df, meta = read_manifest(tmp_path / "m.csv")
    row = df[df["format"] == "nifti"].iloc[0]
    assert "3 NaN, 1 Inf" in row["problems"]
    loaded = load_image(row, Path(meta["root"]))
    assert np.isfinite(loaded.array).all() and loaded.problems
    assert loaded.array[0, 1, 1, 1] == loaded.array.max()  # +Inf -> the largest finite value


def test_unreadable_directory(tmp_path: Path, monkeypatch):
    """chmod 000 does not stop root, so the listing seam raises the PermissionError a user would get."""
    root = tmp_path / "data"
    _good_series(root / "good")
    locked = root / "locked"
    locked.mkdir()
    (locked / "x.dcm").write_bytes(b"")
    real_list = listing._list_dir
    if os.geteuid() == 0:
        def fake_listing(path):
            if Path(path) == locked:
                raise PermissionError(13, "Permission denied", str(path))
            return real_list(path)
        monkeypatch.setattr(listing, "_list_dir", fake_listing)
    else:
        locked.chmod(0)
    try:
        build_manifest(root, tmp_path / "m.csv", salt="s", workers=1, progress=False)
    finally:
        locked.chmod(0o755)
    assert _skipped(tmp_path / "m.csv")["locked"].startswith("unreadable directory")
    assert len(read_manifest(tmp_path / "m.csv")[0]) == 1


def test_symlink_loop_and_odd_names(tmp_path: Path):
    """A folder linking to its parent is listed once, not forever; '|' in a name cannot enter `paths`."""
    root = tmp_path / "data"
    _good_series(root / "good")
    (root / "good" / "loop").symlink_to(root, target_is_directory=True)
    (root / "a|b.dcm").write_bytes(b"")
    build_manifest(root, tmp_path / "m.csv", salt="s", workers=1, progress=False)
    df, _ = read_manifest(tmp_path / "m.csv")
    assert len(df) == 1 and df["n_files"].item() == 4
    assert _skipped(tmp_path / "m.csv")["a|b.dcm"].startswith("unsupported")


def test_missing_codec_names_the_package(tmp_path: Path, monkeypatch):
    root = tmp_path / "data"
    _good_series(root / "good")
    shutil.copy(get_testdata_file("JPEG2000.dcm"), root / "j2k.dcm")
    monkeypatch.setattr(scan, "_decoder_available", lambda ts: False)
    build_manifest(root, tmp_path / "m.csv", salt="s", workers=1, progress=False)
    reason = _skipped(tmp_path / "m.csv")["j2k.dcm"]
    assert reason.startswith("missing codec") and "pip install pylibjpeg pylibjpeg-openjpeg" in reason
    assert "medssl[codecs]" in reason


def test_missing_folder_is_a_data_error(tmp_path: Path):
    with pytest.raises(DataError, match="not a folder"):
        build_manifest(tmp_path / "nowhere", tmp_path / "m.csv", salt="s")


def test_file_gone_after_indexing_is_a_data_error(tmp_path: Path):
    paths = _good_series(tmp_path / "data")
    build_manifest(tmp_path / "data", tmp_path / "m.csv", salt="s", workers=1, progress=False)
    df, meta = read_manifest(tmp_path / "m.csv")
    paths[2].write_bytes(b"garbage")
    with pytest.raises(DataError) as err:
        load_image(df.iloc[0], Path(meta["root"]))
    assert "what to do" in str(err.value) and "where" in str(err.value)


# ------------------------------------------------------------------------------------------ labels
LABEL_CASES = {
    "duplicate": ("patient_id,label\nMRN0000123,1\nB,0\nMRN0000123,0\n", "duplicate id", "rows [2, 4]"),
    "no_id_column": ("subject,label\nA,1\n", "no id column", "labels.csv"),
    "mixed_types": ("patient_id,label\nA,1\nB,0\nC,maybe\n", "wrong type", "row 4"),
    "non_integer": ("patient_id,grade\nA,1.5\nB,2\n", "wrong type", "column 'grade'"),
    "no_label_column": ("patient_id\nA\n", "no label column", "labels.csv"),
    "empty_id": ("patient_id,label\nA,1\n,0\n", "empty id", "row 3"),
    "wrong_join": ("path,label\na.dcm,1\n", "no 'series_uid' column", "labels.csv"),
}


@pytest.mark.parametrize("case", list(LABEL_CASES))
def test_bad_labels_are_clear_errors(case: str, tmp_path: Path):
    text, what, where = LABEL_CASES[case]
    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(DataError) as err:
        read_labels(path, join_on="series_uid" if case == "wrong_join" else "auto")
    message = str(err.value)
    assert what in message and where in message and "what to do" in message
    assert "MRN0000123" not in message  # ids (MRNs in real data) never reach the console


def test_label_column_clashing_with_manifest(tmp_path: Path):
    _good_series(tmp_path / "data")
    (tmp_path / "labels.csv").write_text("patient_id,modality\nGOOD-1,1\n")
    with pytest.raises(DataError, match="would overwrite manifest columns"):
        build_manifest(tmp_path / "data", tmp_path / "m.csv", labels=tmp_path / "labels.csv", salt="s", workers=1,
                       progress=False)


def test_bad_labels_fail_before_scanning(tmp_path: Path, monkeypatch):
    (tmp_path / "labels.csv").write_text("patient_id,label\nA,1\nA,1\n")
    monkeypatch.setattr(scan, "scan_folder", lambda *a, **k: pytest.fail("scanned despite broken labels"))
    with pytest.raises(DataError):
        build_manifest(tmp_path, tmp_path / "m.csv", labels=tmp_path / "labels.csv", salt="s")


def test_unknown_label_ids_are_reported_not_fatal(tmp_path: Path):
    _good_series(tmp_path / "data")
    (tmp_path / "labels.csv").write_text("patient_id,label\nGOOD-1,1\nNOBODY,0\n")
    summary = build_manifest(tmp_path / "data", tmp_path / "m.csv", labels=tmp_path / "labels.csv", salt="s",
                             workers=1, progress=False)
    from medssl.ingest.manifest import pseudonym
    assert summary.unmatched_labels == [f"{pseudonym('pat-', 'NOBODY', 's')} (line 3)"] and summary.n_labelled == 1
    assert "1 label rows matched no image" in summary.render() and "NOBODY" not in summary.render()
