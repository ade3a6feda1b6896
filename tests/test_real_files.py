"""Every real file the environment ships (pydicom test files, pydicom-data, nibabel test data, dicom3tools,
ITK examples) is indexed without a crash or hang: each image loads with the shape the manifest promised, or
the manifest / loader says clearly why not."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medssl.ingest.decode import load_image
from medssl.ingest.manifest import build_manifest, read_manifest
from medssl.errors import DataError

pytestmark = pytest.mark.timeout(120)
LOAD_LIMIT_MB = 64  # decode images up to this declared size; bigger ones are covered by shape-from-header only


def _pydicom_files() -> Path:
    pydicom = pytest.importorskip("pydicom")
    return Path(pydicom.__file__).parent / "data" / "test_files"


def _pydicom_data() -> Path:
    pytest.importorskip("data_store")  # the pydicom-data package
    from pydicom.data import get_testdata_file
    return Path(get_testdata_file("emri_small.dcm")).parent


def _nibabel_data() -> Path:
    nib = pytest.importorskip("nibabel")
    return Path(nib.__file__).parent / "tests" / "data"


def _system_files(tmp_path: Path) -> Path:
    itk = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data")
    found = [Path("/usr/share/doc/dicom3tools/examples/0051.dcm"), itk / "KmeansTest_T1UCharRaw.nii.gz",
             itk / "BrainProtonDensitySlice.png", itk / "VisibleWomanHeadSlice.png"]
    found = [p for p in found if p.is_file()]
    if not found:
        pytest.skip("neither dicom3tools nor insighttoolkit5-examples installed")
    tmp_path.mkdir(parents=True, exist_ok=True)
    for path in found:
        shutil.copy(path, tmp_path / path.name)
    return tmp_path


SOURCES = {"pydicom": _pydicom_files, "pydicom-data": _pydicom_data, "nibabel": _nibabel_data}
# files whose outcome is known: (format, shape) for images, a reason prefix for skipped ones
KNOWN = {
    "pydicom": {"CT_small.dcm": ("dicom-2d", "128x128"), "MR_small.dcm": ("dicom-2d", "64x64"),
                "examples_ybr_color.dcm": ("dicom-multiframe", "320x240x30"),
                "examples_overlay.dcm": ("dicom-2d", "484x300"),
                "dicomdirtests/98892001/CT5N/3353": ("dicom-series", "16x16x5"),
                "MR_truncated.dcm": "truncated", "liver_1frame.dcm": "not an image: SEG",
                "dicomdirtests/DICOMDIR": "not an image: DICOMDIR", "rtplan.dcm": "not an image: RTPLAN",
                "MR_small_bigendian.dcm": "duplicate"},
    "pydicom-data": {"emri_small.dcm": ("dicom-multiframe", "64x64x10"),
                     "eCT_Supplemental.dcm": ("dicom-multiframe", "512x512x2"),
                     "RG1_J2KI.dcm": ("dicom-2d", "1841x1955"),
                     "RG1_UNCI.dcm": "duplicate",  # the same SOP instance as RG1_J2KI: one copy kept "MR2_J2KI.dcm": ("dicom-2d", "1024x1024"),
                     "liver.dcm": "not an image: SEG"},
    "nibabel": {"anatomical.nii": ("nifti", "33x41x25"), "example4d.nii.gz": ("nifti", "128x96x24"),
                "example_nifti2.nii.gz": ("nifti", "32x20x12"), "row_major.dconn.nii": "unsupported",
                "analyze.hdr": "not an image"},
}


def _index(root: Path, tmp_path: Path):
    out = tmp_path / "out" / "real.csv"
    summary = build_manifest(root, out, salt="s", workers=2, progress=False)
    df, meta = read_manifest(out)
    table = pd.read_csv(out.with_suffix(".skipped.csv"), dtype=str, keep_default_na=False)
    skipped = dict(zip(table["path"], table["reason"]))
    assert summary.n_images == len(df) > 0
    assert summary.n_files == len(df["paths"].str.split("|").explode()) + len(skipped)
    assert all(reason.split(":")[0].strip() for reason in skipped.values())
    return df, meta, skipped


def _small(row) -> bool:
    return np.prod([int(s) for s in row["shape"].split("x")]) * 4 / 2**20 <= LOAD_LIMIT_MB


def _check_loads(df, meta) -> int:
    """Number of images decoded; every other one must have failed with an attributable DataError."""
    loaded = 0
    for _, row in df.iterrows():
        if not _small(row):
            continue
        try:
            image = load_image(row, Path(meta["root"]))
        except DataError as err:  # a clear, attributable refusal is an acceptable outcome
            assert row["paths"].split("|")[0] in str(err) and "what to do" in str(err)
            continue
        assert "x".join(map(str, image.array.shape[1:])) == row["shape"], row["paths"]
        assert image.array.dtype == np.float32 and np.isfinite(image.array).all()
        loaded += 1
    return loaded


def _check_known(name: str, df, skipped) -> None:
    for path, outcome in KNOWN[name].items():
        if isinstance(outcome, tuple):
            row = df[df["paths"].str.split("|").str[0] == path]
            assert len(row) == 1, (path, skipped.get(path))
            assert (row["format"].item(), row["shape"].item()) == outcome, path
        else:
            assert skipped[path].startswith(outcome), (path, skipped[path])


@pytest.mark.parametrize("name", ["pydicom", "pydicom-data"])
def test_fast_reader_agrees_with_pydicom(name: str):
    """Every real file the fast reader accepts gives the header (and pixels) pydicom gives."""
    import pydicom
    from medssl.ingest.dicom.parse import parse, pixels_at, read_slice
    from medssl.ingest.scan import _pydicom_header, dicom_header
    accepted = 0
    for path in sorted(p for p in SOURCES[name]().rglob("*") if p.is_file()):
        if parse(str(path)) is None:
            continue
        accepted += 1
        header = dicom_header(str(path), 4096)
        known = header.pop("known", None)   # where the cache will read the pixels (known.py): checked below
        assert header == _pydicom_header(str(path), 4096, False), path
        fast = read_slice(str(path))
        if fast is not None:
            np.testing.assert_array_equal(fast[0], pydicom.dcmread(path).pixel_array, err_msg=str(path))
        if known is not None:
            pixels = pixels_at(path.read_bytes(), known[1])
            np.testing.assert_array_equal(pixels, pydicom.dcmread(path).pixel_array, err_msg=str(path))
    assert accepted >= 10


@pytest.mark.parametrize("name", list(SOURCES))
def test_package_files(name: str, tmp_path: Path):
    df, meta, skipped = _index(SOURCES[name](), tmp_path)
    _check_known(name, df, skipped)
    small = int(df.apply(_small, axis=1).sum())
    assert _check_loads(df, meta) >= 0.9 * small  # a few test files are deliberately undecodable


def test_system_files(tmp_path: Path):
    root = _system_files(tmp_path / "in")
    df, meta, skipped = _index(root, tmp_path)
    assert not skipped
    shapes = dict(zip(df["paths"], df["shape"]))
    if (root / "0051.dcm").exists():
        assert shapes["0051.dcm"] == "360x360"
    if (root / "KmeansTest_T1UCharRaw.nii.gz").exists():
        assert shapes["KmeansTest_T1UCharRaw.nii.gz"] == "128x128x62"
        assert shapes["BrainProtonDensitySlice.png"] == "181x217"   # palette PNG: (X, Y) = (width, height)
        assert shapes["VisibleWomanHeadSlice.png"] == "142x167"     # RGB photograph -> one luma channel
    assert _check_loads(df, meta) == len(df)
