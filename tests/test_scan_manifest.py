"""A messy folder (series derived from a real T1 with duplicates, a gap, a localizer, a stray slice, multi-frame
objects, a 2D radiograph, NIfTI, junk) becomes the right manifest rows, problems, skipped report and labels,
with no PHI in anything written."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from pydicom.data import get_testdata_file

import medssl.ingest.scan as scan
from medssl.demo.dicom_writer import write_series
from medssl.ingest.decode import load_image
from medssl.ingest.manifest import build_manifest, pseudonym, read_manifest, write_manifest

from dicom_cohorts import oblique_affine, real_volume, rotation, write_enhanced, write_messy_folder

pytestmark = pytest.mark.timeout(90)
SALT = "test-salt"


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("messy") / "data"
    expected = write_messy_folder(root, np.random.default_rng(7))
    vol, affine = real_volume()
    # a stray sagittal slice inside the gap series (same SeriesInstanceUID): a lone localizer-like slice
    write_series(vol[:, :, :1], rotation((0, 90, 0)) @ affine, root / "p3" / "stray", patient_name="Brown^Carol",
                 patient_id="PID-CAROL-03", study_uid=expected["study"]["gap"], series_uid=expected["series"]["gap"])
    write_enhanced(vol[:, :, :9], oblique_affine(affine), root / "p5" / "enhanced.dcm", patient_id="PID-ERIN-05",
                   frame_order=np.random.default_rng(1).permutation(9))
    emri = get_testdata_file("emri_small.dcm")
    if emri is not None:  # pydicom-data installed
        shutil.copy(emri, root / "emri_small.dcm")
    bob = pseudonym("pat-", "PID-BOB-02", SALT)
    (root / "labels.csv").write_text(f"patient_id,label\nPID-ALICE-01,lesion\n{bob},normal\nPID-CAROL-03,normal\n"
                                     f"NOBODY,lesion\n")
    return root, {**expected, "emri": emri is not None}


@pytest.fixture(scope="module")
def manifest(messy, tmp_path_factory):
    root, expected = messy
    out = tmp_path_factory.mktemp("out") / "messy.csv"
    summary = build_manifest(root, out, labels=root / "labels.csv", salt=SALT, workers=1, progress=False)
    df, meta = read_manifest(out)
    return summary, df, meta, out


def _row(df: pd.DataFrame, prefix: str) -> pd.Series:
    rows = df[df["paths"].str.startswith(prefix)]
    assert len(rows) == 1, (prefix, df["paths"].tolist())
    return rows.iloc[0]


def test_rows_and_formats(manifest, messy):
    _, df, _, _ = manifest
    # the gap series is two contiguous blocks
    expected = {"dicom-series": 4, "dicom-2d": 1, "dicom-multiframe": 1 + messy[1]["emri"], "nifti": 1,
                "image-2d": 1}
    assert df["format"].value_counts().to_dict() == expected
    assert set(df["spatial_dims"]) == {2, 3}
    assert df["image_id"].is_unique and df["image_id"].str.match(r"^img-[0-9a-f]{12}$").all()
    for column, prefix in (("patient_id", "pat-"), ("study_id", "stu-"), ("series_id", "ser-")):
        assert df[column].str.match(rf"^{prefix}[0-9a-f]{{12}}$").all()
    good = _row(df, "p1/t1/")
    assert (good["shape"], good["n_files"], good["problems"]) == ("33x41x12", 12, "")
    cr = _row(df, "p4/")
    assert (cr["modality"], cr["spatial_dims"], cr["photometric"], cr["shape"]) == ("CR", 2, "MONOCHROME1", "33x41")
    assert _row(df, "nifti/")["modality"] == "MR" and _row(df, "nifti/")["orientation"] == "LAS"
    assert _row(df, "p5/")["shape"] == "33x41x9" and _row(df, "p5/")["problems"] == ""
    photo = _row(df, "photos/")
    assert (photo["modality"], photo["spatial_dims"], photo["shape"]) == ("OT", 2, "33x41")
    assert photo["photometric"] == "RGB"
    if messy[1]["emri"]:
        assert _row(df, "emri_small")["shape"] == "64x64x10"


def test_slice_order_follows_the_normal(manifest, messy):
    _, df, _, _ = manifest
    root, expected = messy
    written = [str(p.relative_to(root)) for p in expected["good"]]
    paths = _row(df, "p1/t1/")["paths"].split("|")
    assert paths in (written, written[::-1])
    assert paths != sorted(paths)  # names were shuffled, so name order would be wrong


def test_problems_flagged(manifest):
    _, df, _, out = manifest
    assert "duplicate SOPInstanceUID" in _row(df, "p2/")["problems"]
    gap = df[df["paths"].str.startswith("p3/mr/")]  # slice 6 of 12 missing: blocks 0..5 and 7..11
    assert sorted(gap["n_files"]) == [5, 6] and gap["series_id"].nunique() == 1
    assert gap["problems"].str.contains("split into 2 contiguous blocks").all()
    assert gap["problems"].str.contains("not in the main stack").all()
    skipped = pd.read_csv(out.with_suffix(".skipped.csv"), dtype=str)
    reasons = dict(zip(skipped["path"], skipped["reason"]))
    assert reasons["p1/scout/IM00000.dcm"].startswith("localizer: scout")
    assert reasons["p3/stray/IM00000.dcm"].startswith("localizer: lone slice")
    assert reasons["p2/ct/copy_of_slice.dcm"].startswith("duplicate: same SOPInstanceUID")
    assert reasons["notes.txt"].startswith("not an image") and reasons["empty.dcm"].startswith("empty file")
    assert "labels.csv" not in reasons


def test_labels_joined(manifest):
    summary, df, meta, _ = manifest
    assert meta["label_columns"] == ["label"]
    assert meta["label_names"] == {"label": {0: "lesion", 1: "normal"}}
    assert str(df["label"].dtype) == "Int64"
    assert _row(df, "p1/t1/")["label"] == 0            # raw PatientID in the labels file
    assert _row(df, "p2/")["label"] == 1               # pseudonymous pat- id in the labels file
    assert (df[df["paths"].str.startswith("p3/mr/")]["label"] == 1).all()
    assert pd.isna(_row(df, "p4/")["label"])
    assert summary.unmatched_labels == [f"{pseudonym('pat-', 'NOBODY', SALT)} (line 5)"]  # never the raw id
    assert (summary.n_labelled, summary.n_unlabelled) == (4, len(df) - 4)
    assert meta["counts"]["labelled"] == 4 and meta["counts"]["unmatched_labels"] == 1


def test_join_on_path(messy, tmp_path):
    root, _ = messy
    (tmp_path / "by_path.csv").write_text("path,label\np1,1\np4/chest.dcm,0\n./nifti/sub-07/,1\n")
    build_manifest(root, tmp_path / "m.csv", labels=tmp_path / "by_path.csv", salt=SALT, workers=1, progress=False)
    df, _ = read_manifest(tmp_path / "m.csv")
    assert (_row(df, "p1/t1/")["label"], _row(df, "p4/")["label"], _row(df, "nifti/")["label"]) == (1, 0, 1)
    assert df["label"].notna().sum() == 3


def test_join_on_series_uid(messy, tmp_path):
    root, expected = messy
    gap = pseudonym("ser-", expected["series"]["gap"], SALT)
    (tmp_path / "by_series.csv").write_text(f"series_uid,label,grade\n{expected['series']['good']},1,\n{gap},0,2\n")
    summary = build_manifest(root, tmp_path / "m.csv", labels=tmp_path / "by_series.csv", salt=SALT, workers=1,
                             progress=False)
    df, meta = read_manifest(tmp_path / "m.csv")
    assert meta["label_columns"] == ["label", "grade"] and summary.n_labelled == 3
    gap = df[df["paths"].str.startswith("p3/mr/")]
    assert _row(df, "p1/t1/")["label"] == 1 and gap["label"].tolist() == [0, 0] and gap["grade"].tolist() == [2, 2]
    assert pd.isna(_row(df, "p1/t1/")["grade"])


def test_no_phi_in_outputs(manifest, messy):
    _, _, _, out = manifest
    _, expected = messy
    text = "".join(p.read_text() for p in (out, out.with_suffix(".skipped.csv"), out.with_suffix(".meta.json")))
    secrets = [v for name, pid in expected["people"].values() for v in (name, pid, *name.split("^"))]
    secrets += ["PID-ERIN-05", "Enhanced^Test", *expected["study"].values(), *expected["series"].values()]
    for secret in secrets:
        assert secret not in text, secret


def test_every_row_loads_with_its_shape(manifest):
    _, df, meta, _ = manifest
    for _, row in df.iterrows():
        loaded = load_image(row, Path(meta["root"]))
        assert loaded.array.dtype == np.float32 and loaded.array.shape[0] == row["channels"]
        assert "x".join(map(str, loaded.array.shape[1:])) == row["shape"]
        assert loaded.array.ndim == row["spatial_dims"] + 1 and loaded.affine.shape == (4, 4)
        assert "".join(nib.aff2axcodes(loaded.affine)) == row["orientation"]


def test_enhanced_frames_sorted_by_position(manifest):
    _, df, meta, _ = manifest
    vol, affine = real_volume()
    loaded = load_image(_row(df, "p5/"), Path(meta["root"]))
    ours = nib.as_closest_canonical(nib.Nifti1Image(loaded.array[0], loaded.affine))
    truth = nib.as_closest_canonical(nib.Nifti1Image(vol[:, :, :9].astype(np.float32), oblique_affine(affine)))
    np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(truth.dataobj))
    np.testing.assert_allclose(ours.affine, truth.affine, atol=1e-3)


def test_deterministic_parallel_and_salted(messy, manifest, tmp_path, monkeypatch):
    root, _ = messy
    _, df, meta, _ = manifest
    monkeypatch.setattr(scan, "IN_PROCESS_BELOW", 0)  # force the process pool even for a small folder
    monkeypatch.setattr(scan, "CHUNK", 16)
    build_manifest(root, tmp_path / "pool.csv", labels=root / "labels.csv", salt=SALT, workers=2, progress=False)
    assert json.loads((tmp_path / "pool.meta.json").read_text())["digest"] == meta["digest"]
    build_manifest(root, tmp_path / "other.csv", salt="another-salt", workers=1, progress=False)
    other, _ = read_manifest(tmp_path / "other.csv")
    assert not set(other["patient_id"]) & set(df["patient_id"])


def test_write_manifest_round_trip(manifest, tmp_path):
    _, df, meta, _ = manifest
    df = df.copy()
    df["split"] = ["train"] * len(df)
    new_meta = write_manifest(df, meta, tmp_path / "again.csv")
    back, back_meta = read_manifest(tmp_path / "again.csv")
    assert back_meta["digest"] == new_meta["digest"] != meta["digest"]
    pd.testing.assert_frame_equal(back, df)


def test_uneven_spacing_and_mixed_matrix(tmp_path):
    """One slice 0.7 mm off its place -> 'uneven slice spacing'; two slices of another matrix size in the
    same series -> set aside as 'mixed series', the main stack kept."""
    import pydicom
    vol, affine = real_volume()
    root = tmp_path / "data"
    uid = pydicom.uid.generate_uid()
    paths = write_series(vol[:, :, :8], affine, root / "a", patient_name="A^B", patient_id="X", series_uid=uid)
    ds = pydicom.dcmread(paths[3])
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    ds.ImagePositionPatient = [x, y, z + 0.7]
    ds.save_as(paths[3], enforce_file_format=True)
    write_series(vol[:20, :, 8:10], affine, root / "b", patient_name="A^B", patient_id="X", series_uid=uid)
    build_manifest(root, tmp_path / "m.csv", salt=SALT, workers=1, progress=False)
    df, _ = read_manifest(tmp_path / "m.csv")
    assert len(df) == 1 and df["n_files"].item() == 8 and df["shape"].item() == "33x41x8"
    assert "uneven slice spacing" in df["problems"].item()
    skipped = pd.read_csv(tmp_path / "m.skipped.csv", dtype=str)
    assert (skipped["reason"].str.startswith("mixed series")).sum() == 2


def test_photo_loads_as_luma(manifest, messy):
    _, df, meta, _ = manifest
    vol, _ = real_volume()
    loaded = load_image(_row(df, "photos/"), Path(meta["root"]))
    grey = (np.clip(vol[:, :, 6], 0, None) / vol.max() * 255).astype(np.uint8)  # (X, Y)
    np.testing.assert_allclose(loaded.array[0], grey, atol=0.01)


def test_file_patients_from_folders(tmp_path):
    """NIfTI patients come from the layout: root/<patient>/... folders; a single container folder for all
    files (root/images/*.nii) is not one patient, each file is."""
    vol, affine = real_volume()
    for rel in ("by_patient/p1/a.nii", "by_patient/p1/b.nii", "by_patient/p2/a.nii", "flat/images/x.nii",
                "flat/images/y.nii"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(vol[:, :, :3], affine), tmp_path / rel)
    for name, n_patients, flagged in (("by_patient", 2, False), ("flat", 2, True)):
        build_manifest(tmp_path / name, tmp_path / f"{name}.csv", salt=SALT, workers=1, progress=False)
        df, _ = read_manifest(tmp_path / f"{name}.csv")
        assert df["patient_id"].nunique() == n_patients, name
        assert df["problems"].str.contains("patient unknown").all() == flagged


def test_enhanced_repeated_positions_keep_first(tmp_path):
    """A multi-echo Enhanced object (each position twice): one 3D volume of the first echo, flagged."""
    vol, affine = real_volume()
    two_echoes = np.concatenate([vol[:, :, :6], vol[:, :, :6] // 2], axis=2)  # frames 6..11 repeat 0..5
    path = write_enhanced(two_echoes, affine, tmp_path / "d" / "me.dcm", patient_id="ME")
    _reposition_frames(path, [k % 6 for k in range(12)], affine)
    build_manifest(tmp_path / "d", tmp_path / "m.csv", salt=SALT, workers=1, progress=False)
    df, meta = read_manifest(tmp_path / "m.csv")
    assert df["shape"].item() == "33x41x6" and "6 frames repeat a position" in df["problems"].item()
    loaded = load_image(df.iloc[0], Path(meta["root"]))
    ours = nib.as_closest_canonical(nib.Nifti1Image(loaded.array[0], loaded.affine))
    truth = nib.as_closest_canonical(nib.Nifti1Image(vol[:, :, :6].astype(np.float32), affine))
    np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(truth.dataobj))


def _reposition_frames(path: Path, slots: list[int], affine: np.ndarray) -> None:
    """Put frame f at the position of slice slots[f] (how multi-echo objects repeat positions)."""
    import pydicom
    from medssl.demo.dicom_writer import affine_to_dicom, format_ds
    geo = affine_to_dicom(affine)
    ds = pydicom.dcmread(path)
    for item, k in zip(ds.PerFrameFunctionalGroupsSequence, slots):
        item.PlanePositionSequence[0].ImagePositionPatient = format_ds(geo["origin"] + k * geo["slice_step"])
    ds.save_as(path, enforce_file_format=True)
