"""Scan hygiene: odd names, odd paths, declared sizes that lie, copies that do not decode, formula cells.
Each case is reported in the skipped report (or kept correctly), and the files of a build agree."""
from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.encaps import encapsulate

from medssl.demo.dicom_writer import write_series
from medssl.ingest.csv_safe import TRIGGERS, neutralise, restore
from medssl.ingest.decode import load_image
from medssl.ingest.manifest import build_manifest, read_manifest

from dicom_cohorts import real_volume
from fuzz_cases import nifti_bomb

pytestmark = pytest.mark.timeout(120)


def _good(folder: Path) -> list[Path]:
    vol, affine = real_volume()
    return write_series(vol[:, :, :4], affine, folder, patient_name="Good^Series", patient_id="GOOD-1")


def _build(root: Path, out: Path, **kwargs):
    summary = build_manifest(root, out, salt="s", workers=1, progress=False, **kwargs)
    df, meta = read_manifest(out)
    table = pd.read_csv(out.with_suffix(".skipped.csv"), dtype=str, keep_default_na=False)
    return summary, df, meta, dict(zip(table["path"], table["reason"]))


def _consistent(meta: dict, skipped: dict, df: pd.DataFrame) -> None:
    assert sum(meta["counts"]["skipped"].values()) == len(skipped) and meta["counts"]["images"] == len(df)


def test_non_utf8_names_are_reported(tmp_path: Path):
    root = tmp_path / "data"
    good = _good(root / "good")
    bad_file = os.path.join(os.fsencode(root), b"caf\xe9.dcm")  # latin-1 bytes: not UTF-8
    with open(bad_file, "wb") as f:
        f.write(good[0].read_bytes())
    bad_dir = os.path.join(os.fsencode(root), b"dir\xff")
    os.mkdir(bad_dir)
    with open(os.path.join(bad_dir, b"x.dcm"), "wb") as f:
        f.write(good[1].read_bytes())
    _, df, meta, skipped = _build(root, tmp_path / "m.csv")
    assert len(df) == 1 and df["n_files"].item() == 4
    assert skipped["caf\\xe9.dcm"].startswith("unsupported name: not valid UTF-8")
    assert skipped["dir\\xff"].startswith("unsupported name: not valid UTF-8")
    _consistent(meta, skipped, df)


def test_paths_seen_and_not_used_are_reported(tmp_path: Path):
    root = tmp_path / "data"
    _good(root / "good")
    (root / "dangling.dcm").symlink_to(root / "gone.dcm")
    os.mkfifo(root / "pipe.dcm")  # opening it would block the scan for good
    (root / "folder.dcm").mkdir()
    _, df, meta, skipped = _build(root, tmp_path / "m.csv")
    assert len(df) == 1
    assert skipped["dangling.dcm"].startswith("broken link")
    assert skipped["pipe.dcm"] == "not a regular file: FIFO (named pipe)"
    assert skipped["folder.dcm"].startswith("not a file: a folder named like an image")
    _consistent(meta, skipped, df)


def _nifti_header_bytes(shape, dtype=np.float32) -> bytes:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = 352
    return header.binaryblock + b"\0" * 4


def _peak_rss_mb(code: str) -> tuple[float, str]:
    """Run `code` in a fresh interpreter; its peak RSS in MB and what it printed. VmHWM, not ru_maxrss: the
    latter carries the forking parent's peak (here pytest's) into the child on Linux."""
    probe = code + ("\nhwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]"
                    "\nprint('RSS', int(hwm.split()[1]) / 1024)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    return float(lines[-1].split()[1]), "\n".join(lines[:-1])


def test_lying_nifti_sizes_refused_before_reading(tmp_path: Path):
    """608 bytes declaring 1000^3 float32; gzips declaring 200^3 over 10 KB and 1000^3 over 1 MB; a real 320 MB
    zero bomb;
    a truncated .nii.gz: all refused from their sizes, in a process whose peak RSS stays small."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "small.nii").write_bytes(_nifti_header_bytes((1000, 1000, 1000)) + b"\0" * 256)
    assert (root / "small.nii").stat().st_size == 608
    (root / "liar.nii.gz").write_bytes(gzip.compress(_nifti_header_bytes((200, 200, 200)) + bytes(10**4)))
    (root / "huge.nii.gz").write_bytes(gzip.compress(_nifti_header_bytes((1000, 1000, 1000)) + bytes(10**6)))
    (root / "bomb.nii.gz").write_bytes(nifti_bomb(320))  # real gzip members of zeros: 320 MB in ~0.3 MB
    vol, affine = real_volume()
    nib.save(nib.Nifti1Image(vol.astype(np.float32), affine), root / "whole.nii.gz")
    data = gzip.decompress((root / "whole.nii.gz").read_bytes())
    (root / "cut.nii.gz").write_bytes(gzip.compress(data[:len(data) // 2]))
    names = ["small.nii", "liar.nii.gz", "huge.nii.gz", "bomb.nii.gz", "cut.nii.gz", "whole.nii.gz"]
    code = (f"from medssl.ingest.scan import read_header\nfor n in {names!r}:\n"
            f"    print(n, '=', read_header(n, {str(root)!r}, 4096).get('skip'))")
    rss, out = _peak_rss_mb(code)
    reasons = dict(line.split(" = ", 1) for line in out.splitlines())
    assert reasons["small.nii"].startswith("truncated: header declares 4,000,000,352 bytes, the file holds 608")
    assert reasons["liar.nii.gz"].startswith("truncated") and "deflate expands at most" in reasons["liar.nii.gz"]
    assert reasons["bomb.nii.gz"].startswith("decompression bound")
    assert reasons["huge.nii.gz"].startswith("decompression bound") and "declares 3,815 MB" in reasons["huge.nii.gz"]
    assert reasons["cut.nii.gz"].startswith("truncated") and reasons["whole.nii.gz"] == "None"
    assert rss < 400, f"peak RSS {rss:.0f} MB: something was allocated from a declared size"


def test_dicom_pixel_data_too_short_for_its_frame(tmp_path: Path):
    root = tmp_path / "data"
    good = _good(root / "good")
    ds = pydicom.dcmread(good[0])
    ds.Rows = ds.Columns = 4096  # 32 MB declared, a few KB present
    ds.SOPInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.save_as(root / "short.dcm", enforce_file_format=True)
    _, df, meta, skipped = _build(root, tmp_path / "m.csv")
    assert len(df) == 1 and df["n_files"].item() == 4
    assert skipped["short.dcm"].startswith("truncated: pixel data holds 2,706 bytes")
    _consistent(meta, skipped, df)


def test_decodable_duplicate_is_kept(tmp_path: Path):
    """Two files, one SOPInstanceUID: the copy first by name holds undecodable JPEG; the other one is kept."""
    root = tmp_path / "data"
    good = _good(root / "s")
    ds = pydicom.dcmread(good[2])
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGBaseline8Bit
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0" + bytes(200)])  # a JPEG marker, then garbage
    ds["PixelData"].VR = "OB"
    broken = root / "s" / "A_copy.dcm"
    ds.save_as(broken, enforce_file_format=True)
    _, df, meta, skipped = _build(root, tmp_path / "m.csv")
    row = df.iloc[0]
    assert row["n_files"] == 4 and "A_copy.dcm" not in row["paths"]
    assert skipped["s/A_copy.dcm"] == f"duplicate: same SOPInstanceUID as s/{good[2].name} (this copy's pixels " \
                                     f"do not decode)"
    assert load_image(row, Path(meta["root"])).array.shape == (1, 33, 41, 4)


def test_formula_cells_neutralised_and_round_trip(tmp_path: Path):
    root = tmp_path / "data"
    good = _good(root / "=cmd")  # a folder name a spreadsheet would run
    (root / "@notes.txt").write_text("x")
    (root / "-x.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    labels = tmp_path / "labels.csv"
    labels.write_text('path,label,+grade\n"=cmd",=HYPERLINK(1),1\n')
    out = tmp_path / "m.csv"
    _, df, meta, _ = _build(root, out, labels=labels)
    for path in (out, out.with_suffix(".skipped.csv"), out.with_suffix(".shared.csv"),
                 out.with_suffix(".shared.skipped.csv")):
        with open(path, newline="") as f:
            cells = [cell for row in csv.reader(f) for cell in row]
        assert cells and not [c for c in cells if c.startswith(TRIGGERS)], path
    assert df["paths"].iloc[0].startswith("=cmd/") and "+grade" in df.columns  # restored on reading
    assert meta["label_names"]["label"] == {0: "=HYPERLINK(1)"}
    assert load_image(df.iloc[0], Path(meta["root"])).array.shape == (1, 33, 41, 4)
    assert len(good) == 4


@pytest.mark.parametrize("value", ["=1+1", "+a", "-a", "@a", "\tx", "\rx", "'=x", "'", "plain", "-1", "-2.5e3"])
def test_neutralise_round_trip(value: str):
    safe = neutralise(value)
    assert restore(safe) == value
    assert not safe.startswith(TRIGGERS) or value in ("-1", "-2.5e3")  # numbers are not formulas


def test_build_files_agree(tmp_path: Path):
    """The CSV's digest is in its meta, and the shared meta names the same digest without the root."""
    root = tmp_path / "data"
    _good(root / "a")
    out = tmp_path / "m.csv"
    _, df, meta, skipped = _build(root, out)
    import hashlib
    assert meta["digest"] == hashlib.sha256(out.read_bytes()).hexdigest()
    shared = json.loads(out.with_suffix(".shared.meta.json").read_text())
    assert shared["digest"] == meta["digest"] and "root" not in shared


def test_every_csv_writer_goes_through_csv_safe():
    """One helper writes every CSV medssl makes: no direct DataFrame.to_csv / csv.writer elsewhere."""
    import medssl
    package = Path(medssl.__file__).parent
    direct = [f"{p.relative_to(package)}:{n}" for p in package.rglob("*.py") if p.name != "csv_safe.py"
              for n, line in enumerate(p.read_text().splitlines(), 1)
              if ".to_csv(" in line or "csv.writer(" in line or "csv.DictWriter(" in line]
    assert not direct, direct


def test_ladder_results_round_trip_neutralised(tmp_path: Path):
    from medssl.ladder.results import append_result, read_results
    out = tmp_path / "results.csv"
    append_result(out, {"key": "=k1", "status": "ok", "arm": "@ssl", "auroc": -0.5})
    append_result(out, {"key": "k2", "status": "ok", "arm": "+x", "auroc": 0.7})
    with open(out, newline="") as f:
        cells = [cell for row in csv.reader(f) for cell in row]
    assert not [c for c in cells if c.startswith(TRIGGERS) and c != "-0.5"]
    back = read_results(out)
    assert back["key"].tolist() == ["=k1", "k2"] and back["arm"].tolist() == ["@ssl", "+x"]
    assert back["auroc"].tolist() == [-0.5, 0.7]


def test_deflated_dicom_indexed_and_deflate_bomb_refused(tmp_path: Path):
    """A genuine Deflated-syntax file is kept (its offsets count inflated bytes, not the file's); one that
    inflates ~1000x past its size is refused by a bounded stream-inflate, before pydicom inflates it whole."""
    from fuzz_cases import dicom_deflate_bomb
    root = tmp_path / "data"
    good = _good(root / "good")
    ds = pydicom.dcmread(good[0])
    ds.SOPInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.save_as(root / "deflated.dcm", enforce_file_format=True)
    (root / "bomb.dcm").write_bytes(dicom_deflate_bomb((root / "deflated.dcm").read_bytes(), 100))
    _, df, meta, skipped = _build(root, tmp_path / "m.csv")
    assert sorted(df["n_files"]) == [1, 4] and "deflated.dcm" in df["paths"].tolist()
    assert skipped["bomb.dcm"].startswith("decompression bound: the deflated dataset inflates beyond 200x")
    row = df[df["paths"] == "deflated.dcm"].iloc[0]
    np.testing.assert_array_equal(load_image(row, Path(meta["root"])).array[0], ds.pixel_array.T.astype(np.float32))
