"""Character sets: the fast header reader and pydicom decode every header string alike, per
SpecificCharacterSet (pydicom's charset test files: ISO_IR 192, ISO_IR 100, ISO 2022 Japanese / Korean, GB18030,
...), so one patient gets one pseudonym whichever path reads the file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_charset_files

from medssl.demo.dicom_writer import write_series
from medssl.ingest.dicom.parse import parse
from medssl.ingest.manifest import build_manifest, read_manifest
from medssl.ingest.scan import _pydicom_header, dicom_header

from dicom_cohorts import real_volume, write_enhanced

CHARSET_FILES = sorted(Path(p) for p in get_charset_files("chr*.dcm"))
pytestmark = pytest.mark.timeout(120)


def _with_name_as_id(source: Path, out: Path) -> str | None:
    """Copy of a charset file whose PatientID holds its (non-ASCII) PatientName, encoded by pydicom in the
    file's own character set (a 2x2 image added where it has no pixels); None for files without a name."""
    ds = pydicom.dcmread(source)
    name = str(ds.get("PatientName") or "")
    if not name or name.isascii():
        return None
    if "PixelData" not in ds:
        ds.Rows = ds.Columns = 2
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.SOPClassUID = ds.get("SOPClassUID") or "1.2.840.10008.5.1.4.1.1.7"
        ds.add_new("PixelData", "OW", np.arange(4, dtype="<u2").tobytes())
    ds.PatientID = name.replace("\\", "")[:64]
    ds.save_as(out, enforce_file_format=True)
    return ds.PatientID


def test_charset_files_cover_the_brief():
    charsets = {str(pydicom.dcmread(p).get("SpecificCharacterSet")) for p in CHARSET_FILES}
    assert {"ISO_IR 192", "ISO_IR 100"} <= charsets and any("ISO 2022 IR 87" in c for c in charsets)


@pytest.mark.parametrize("source", CHARSET_FILES, ids=lambda p: p.name)
def test_fast_reader_decodes_like_pydicom(source: Path, tmp_path: Path):
    path = tmp_path / source.name
    patient_id = _with_name_as_id(source, path)
    if patient_id is None:
        pytest.skip("no non-ASCII PatientName with pixels to carry")
    assert parse(str(path)) is not None, "the fast reader must stay in its lane for these files"
    fast = dicom_header(str(path), 4096)
    fast.pop("known", None)   # where the cache reads the pixels later (known.py): not a header field
    assert fast == _pydicom_header(str(path), 4096, False)
    assert fast["patient_id"] == str(pydicom.dcmread(path).PatientID) == patient_id.strip()


def test_one_patient_one_pseudonym_across_paths(tmp_path: Path):
    """'MÜLLER-7' in UTF-8: a single-frame uncompressed series (fast reader) and an Enhanced multi-frame object
    (pydicom) are one patient, and one labels row by PatientID labels both."""
    vol, affine = real_volume()
    vol = vol[:, :, :4]
    folder = tmp_path / "in"
    write_series(vol, affine, folder / "series", patient_name="Muller^Hans", patient_id="MÜLLER-7",
                 extra={"SpecificCharacterSet": "ISO_IR 192"})
    enhanced = write_enhanced(vol, affine, folder / "enhanced" / "mf.dcm", patient_id="MÜLLER-7")
    ds = pydicom.dcmread(enhanced)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientID = "MÜLLER-7"
    ds.save_as(enhanced, enforce_file_format=True)
    assert "MÜLLER-7".encode("utf-8") in enhanced.read_bytes()
    assert parse(str(sorted((folder / "series").iterdir())[0])) is not None  # the series takes the fast path
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"patient_id": ["MÜLLER-7"], "label": [1]}).to_csv(labels, index=False)
    summary = build_manifest(folder, tmp_path / "m.csv", labels=labels, salt="s", workers=1, progress=False)
    df, _ = read_manifest(tmp_path / "m.csv")
    assert sorted(df["format"]) == ["dicom-multiframe", "dicom-series"]
    assert df["patient_id"].nunique() == 1
    assert df["label"].tolist() == [1, 1] and summary.n_labelled == 2 and not summary.unmatched_labels
    np.testing.assert_array_equal(sorted(df["shape"]), ["33x41x4", "33x41x4"])
