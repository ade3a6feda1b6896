"""Mutated real DICOM / NIfTI files for the fuzz tests (tests/test_fuzz.py, benchmarks/bench_fuzz.py).

Seeds are real files: pydicom's test files, a series written from nibabel's anatomical T1, nibabel's NIfTI test
data. Each mutated file is written BESIDE its untouched seed (same folder), so the fuzz also checks that a bad
neighbour never costs a good file. DICOM copies get fresh SOP / Series UIDs before mutation, so they are not
duplicates of (or slices of) their seed. Kinds:
  flip       1-32 random bytes changed (half of them in the first 2 KB, where the header lives)
  truncate   cut at a random offset
  huge       declared sizes inflated: DICOM Rows / Columns / NumberOfFrames, NIfTI dim[1..4]
  gzip_bomb  NIfTI .nii.gz (multi-member gzip of zeros) or Deflated-syntax DICOM whose data inflates ~1000x
"""
from __future__ import annotations

import gzip
import io
import shutil
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medssl.demo.dicom_writer import write_series

from dicom_cohorts import NIBABEL_DATA, real_volume

KINDS = ("flip", "truncate", "huge", "gzip_bomb")
PYDICOM_SEEDS = ("CT_small.dcm", "MR_small.dcm", "emri_small.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm",
                 "MR_small_implicit.dcm", "SC_rgb_jpeg_dcmtk.dcm", "mlut_18.dcm", "chrX1.dcm")
_ZEROS_MB = zlib.compress(bytes(2**20), 9)   # one gzip-able megabyte of zeros, reused by every bomb


def seed_files(root: Path) -> list[Path]:
    """Real seed files copied under root/<name>/, one folder each (their mutants go beside them)."""
    seeds = []
    for name in PYDICOM_SEEDS:
        found = get_testdata_file(name)
        if found is None and name.startswith("chr"):
            found = next(iter(pydicom.data.get_charset_files(name)), None)
        if found is not None:
            (root / Path(name).stem).mkdir(parents=True, exist_ok=True)
            seeds.append(Path(shutil.copy(found, root / Path(name).stem / name)))
    vol, affine = real_volume()
    seeds += write_series(vol[:, :, :3], affine, root / "series", patient_name="Fuzz^Seed", patient_id="FUZZ-1")
    for name in ("anatomical.nii", "example4d.nii.gz"):
        (root / name.split(".")[0]).mkdir(exist_ok=True)
        seeds.append(Path(shutil.copy(NIBABEL_DATA / name, root / name.split(".")[0] / name)))
    (root / "t1gz").mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(vol.astype(np.float32), affine), root / "t1gz" / "t1.nii.gz")
    return seeds + [root / "t1gz" / "t1.nii.gz"]


def _is_nifti(path: Path) -> bool:
    return path.name.endswith((".nii", ".nii.gz"))


def _fresh_dicom(path: Path) -> bytes:
    """The seed with new SOP / Series UIDs (a separate object, not a copy of the seed), as bytes."""
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    if getattr(ds, "file_meta", None) is not None:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _flip(data: bytes, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    n = int(rng.integers(1, 33))
    where = np.concatenate([rng.integers(0, min(2048, len(out)), n // 2 + 1), rng.integers(0, len(out), n // 2)])
    for i in where:
        out[int(i)] = int(rng.integers(0, 256))
    return bytes(out)


def _huge_dicom(data: bytes, rng: np.random.Generator) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.Rows, ds.Columns = (int(np.exp(rng.uniform(np.log(256), np.log(65535)))) for _ in range(2))  # log-uniform
    if rng.random() < 0.5:
        ds.NumberOfFrames = int(rng.integers(2, 10000))
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _huge_nifti(data: bytes, gz: bool, rng: np.random.Generator) -> bytes:
    raw = bytearray(gzip.decompress(data) if gz else data)
    dims = np.frombuffer(raw, "<i2", 8, 40).copy()  # NIfTI-1 dim[0..7] at byte 40 (little endian test data)
    dims[1:4] = np.exp(rng.uniform(np.log(40), np.log(32767), 3)).astype(int)  # some pass max_image_mb
    raw[40:56] = dims.astype("<i2").tobytes()
    return gzip.compress(bytes(raw), 1) if gz else bytes(raw)


def nifti_bomb(declared_mb: int) -> bytes:
    """A .nii.gz whose header declares ~declared_mb of float32 and whose gzip members really hold that many
    zeros: ~1000x smaller on disk (multi-member gzip, so it costs nothing to make)."""
    side = int(round((declared_mb * 2**20 / 4) ** (1 / 3)))
    header = nib.Nifti1Header()
    header.set_data_shape((side, side, side))
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    member = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + _ZEROS_MB[2:-4] + \
        zlib.crc32(bytes(2**20)).to_bytes(4, "little") + (2**20).to_bytes(4, "little")
    return gzip.compress(header.binaryblock + bytes(4)) + member * (side ** 3 * 4 // 2**20 + 1)


def dicom_deflate_bomb(data: bytes, inflated_mb: int) -> bytes:
    """The seed re-encoded in the Deflated transfer syntax, followed by a private element (7FE1,1010)
    holding inflated_mb of zeros: the file stays ~1000x smaller than its inflated dataset."""
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    meta = pydicom.filebase.DicomBytesIO()
    pydicom.filewriter.write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    body = pydicom.filebase.DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(body, ds)
    element = b"\xe1\x7f\x10\x10OB\x00\x00" + (inflated_mb * 2**20).to_bytes(4, "little")
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = packer.compress(body.getvalue() + element) + packer.flush(zlib.Z_FULL_FLUSH)
    block = packer.compress(bytes(2**20)) + packer.flush(zlib.Z_FULL_FLUSH)  # the same bytes every MB
    return b"\0" * 128 + b"DICM" + meta.getvalue() + head + block * inflated_mb + packer.flush()


def mutate(seed: Path, kind: str, rng: np.random.Generator) -> tuple[bytes, str]:
    """(mutated bytes, file suffix) of one seed."""
    nifti, gz = _is_nifti(seed), seed.name.endswith(".gz")
    data = seed.read_bytes() if nifti else _fresh_dicom(seed)
    suffix = ".nii.gz" if gz else ".nii" if nifti else ".dcm"
    if kind == "flip":
        return _flip(data, rng), suffix
    if kind == "truncate":
        return data[:int(rng.integers(0, len(data)))], suffix
    if kind == "huge":
        return (_huge_nifti(data, gz, rng) if nifti else _huge_dicom(data, rng)), suffix
    if nifti:
        return nifti_bomb(int(np.exp(rng.uniform(np.log(64), np.log(4000))))), ".nii.gz"
    return dicom_deflate_bomb(data, int(rng.integers(80, 400))), ".dcm"


def write_fuzz_folder(root: Path, n: int, seed: int = 0) -> tuple[list[Path], dict[str, str]]:
    """Seeds plus n mutants beside them. Returns (seed paths, {mutant relative path: kind})."""
    rng = np.random.default_rng(seed)
    seeds = seed_files(root)
    kinds = {}
    for i in range(n):
        source, kind = seeds[int(rng.integers(len(seeds)))], KINDS[i % len(KINDS)]
        try:
            data, suffix = mutate(source, kind, rng)
        except Exception:  # noqa: BLE001 - a seed pydicom cannot re-save in this form: try a plain flip
            data, suffix, kind = _flip(source.read_bytes(), rng), "".join(source.suffixes) or ".dcm", "flip"
        path = source.parent / f"fuzz{i:05d}_{kind}{suffix}"
        path.write_bytes(data)
        kinds[str(path.relative_to(root))] = kind
    return seeds, kinds


def kept_paths(df) -> set[str]:
    return {p for paths in df["paths"] for p in str(paths).split("|")}


def run_fuzz(root: Path, out: Path, kinds: dict[str, str], must_keep: set[str], *, workers: int = 1,
             max_image_mb: float = 256) -> dict:
    """Index + decode the fuzz folder. Returns {"outcomes": {kind: {outcome: count}}, "errors": [...],
    "lost": [good files not kept]}; an error is any failure that is not a skip or a DataError."""
    from medssl.errors import DataError
    from medssl.ingest.decode import load_image
    from medssl.ingest.manifest import build_manifest, read_manifest
    import pandas as pd
    build_manifest(root, out, salt="fuzz", workers=workers, max_image_mb=max_image_mb, progress=False)
    df, meta = read_manifest(out)
    skipped = pd.read_csv(out.with_suffix(".skipped.csv"), dtype=str, keep_default_na=False)
    reasons = dict(zip(skipped["path"], skipped["reason"]))
    outcome, errors = {}, []
    for _, row in df.iterrows():
        try:
            load_image(row, Path(meta["root"]))
            result = "kept, decodes"
        except DataError:
            result = "kept, decode refused (DataError)"
        except Exception as err:  # noqa: BLE001 - the fuzz's finding
            result = "kept, decode CRASHED"
            errors.append(f"{row['paths']}: {type(err).__name__}: {err}")
        for path in row["paths"].split("|"):
            outcome[path] = result
    for path, reason in reasons.items():
        outcome[path] = "skipped: " + reason.split(":")[0]
    counts: dict = {}
    for path, kind in kinds.items():
        label = outcome.get(path, "MISSING from manifest and skipped report")
        counts.setdefault(kind, {}).setdefault(label, 0)
        counts[kind][label] += 1
        if label.startswith("MISSING"):
            errors.append(f"{path}: neither kept nor reported")
    return {"outcomes": counts, "errors": errors, "lost": sorted(must_keep - kept_paths(df)),
            "images": len(df), "files": int(meta["counts"]["files"])}
