"""Labels by path (relative to the scanned folder, to the labels file, or absolute; nothing matching fails at
once with an example), and no identifier in what leaves the machine: shared manifest copies with date-like and
id-like path parts replaced, skip reasons that quote no header value, unmatched ids shown as pseudonyms."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pydicom
import pytest

from medssl.demo.dicom_writer import write_series
from medssl.errors import DataError
from medssl.ingest.manifest import build_manifest, pseudonym, read_manifest
from medssl.ingest.redact import clean_reason, display_path

from dicom_cohorts import real_volume

pytestmark = pytest.mark.timeout(120)


def _folder(root: Path) -> Path:
    """Two patients in a BIDS-like layout whose folder names carry a study date and an MRN."""
    vol, affine = real_volume()
    for n, sub in enumerate(("sub-01", "sub-02")):
        write_series(vol[:, :, :3], affine, root / sub / "ses-20200619" / f"MRN000012{n}",
                     patient_name="A^B", patient_id=f"PID-{n}")
    return root


def _build(root: Path, labels: Path, tmp_path: Path):
    summary = build_manifest(root, tmp_path / "out" / "m.csv", labels=labels, salt="s", workers=1, progress=False)
    return summary, read_manifest(tmp_path / "out" / "m.csv")[0]


@pytest.mark.parametrize("form", ["scanned folder", "labels file", "absolute"])
def test_label_paths_in_every_form(form: str, tmp_path: Path):
    root = _folder(tmp_path / "data")
    labels_dir = tmp_path / "tables"
    labels_dir.mkdir()
    prefix = {"scanned folder": "", "labels file": "../data/", "absolute": f"{root}/"}[form]
    labels = labels_dir / "labels.csv"
    labels.write_text(f"path,label\n{prefix}sub-01,1\n{prefix}sub-02/ses-20200619,0\n")
    summary, df = _build(root, labels, tmp_path)
    assert summary.n_labelled == 2 and not summary.unmatched_labels
    assert dict(zip(df["paths"].str[:6], df["label"])) == {"sub-01": 1, "sub-02": 0}


def test_nothing_matching_fails_at_once_with_an_example(tmp_path: Path):
    root = _folder(tmp_path / "data")
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\nelsewhere/sub-01,1\n")
    with pytest.raises(DataError) as err:
        _build(root, labels, tmp_path)
    message = str(err.value)
    assert "no row of the labels file matched any of the 2 images" in message
    assert "'elsewhere/sub-01'" in message and "image paths look like 'sub-01/ses-#" in message
    assert "20200619" not in message and not (tmp_path / "out" / "m.csv").exists()


def test_nothing_matching_by_patient_shows_pseudonyms(tmp_path: Path):
    root = _folder(tmp_path / "data")
    labels = tmp_path / "labels.csv"
    labels.write_text("patient_id,label\nMRN0000999,1\n")
    with pytest.raises(DataError) as err:
        _build(root, labels, tmp_path)
    assert pseudonym("pat-", "MRN0000999", "s") in str(err.value) and "MRN0000999" not in str(err.value)


def test_display_path_replaces_dates_and_ids():
    shown = display_path("sub-01/ses-20200619/anat/MRN0000123_2020-06-19_T1w.nii.gz", "salt")
    parts = shown.split("/")
    assert parts[0] == "sub-01" and parts[1].startswith("ses-#") and parts[2] == "anat"
    assert parts[3].endswith("_T1w.nii.gz") and "MRN" not in shown and "2020" not in shown and "0619" not in shown
    assert shown == display_path("sub-01/ses-20200619/anat/MRN0000123_2020-06-19_T1w.nii.gz", "salt")
    assert shown != display_path("sub-01/ses-20200619/anat/MRN0000123_2020-06-19_T1w.nii.gz", "other")
    assert display_path("p1/t1/scan.dcm", "salt") == "p1/t1/scan.dcm"


def test_clean_reason_drops_quoted_values():
    assert clean_reason("invalid literal for int() with base 10: b'MRN0000123'") == \
        "invalid literal for int() with base 10: '…'"
    assert "0000123" not in clean_reason("bad value MRN0000123 in header")


def test_shared_copies_carry_no_identifier(tmp_path: Path):
    root = _folder(tmp_path / "data")
    first = sorted((root / "sub-01" / "ses-20200619" / "MRN0000120").iterdir())[0]
    ds = pydicom.dcmread(first)  # a header value that breaks reading, quoted by the exception
    ds.SOPInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.add_new(0x00280008, "LO", "MRN0000123")  # NumberOfFrames, written with a VR that lets it hold text
    ds.save_as(root / "odd.dcm", enforce_file_format=True)
    labels = tmp_path / "labels.csv"
    labels.write_text("patient_id,label\nPID-0,1\nMRN0000777,0\n")
    summary, df = _build(root, labels, tmp_path)
    out = tmp_path / "out" / "m.csv"
    skipped = pd.read_csv(out.with_suffix(".skipped.csv"), dtype=str)
    assert skipped["reason"].str.startswith("unreadable").any()
    local = out.read_text()
    assert "20200619" in local  # the loader needs the real relative paths, kept on this machine only
    shared = "".join(p.read_text() for p in out.parent.glob("m.shared.*"))
    assert len(list(out.parent.glob("m.shared.*"))) == 3
    for secret in ("20200619", "MRN000012", "MRN0000123", "MRN0000777", "PID-0", str(root)):
        assert secret not in shared, secret
    assert "MRN0000123" not in out.with_suffix(".skipped.csv").read_text()
    assert "MRN0000777" not in summary.render() and pseudonym("pat-", "MRN0000777", "s") in summary.render()
    assert len(pd.read_csv(out.with_suffix(".shared.csv"))) == len(df) == 2


def test_header_only_labels_file_is_not_a_crash(tmp_path: Path):
    root = _folder(tmp_path / "data")
    labels = tmp_path / "labels.csv"
    labels.write_text("patient_id,label\n")
    summary, df = _build(root, labels, tmp_path)
    assert summary.n_labelled == 0 and len(df) == 2
