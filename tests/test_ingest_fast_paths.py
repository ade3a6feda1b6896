"""The ingest shortcuts (issue 11 item 11) give the answers of the plain paths: a DICOM series stacked as
stored and rescaled in one pass equals pydicom's per-slice modality values (per-slice slopes included, and a
slice pydicom must decode among fast ones); the percentile sample of a transposed or flipped array is the
C-order sample the MONAI chain takes; a DICOM series cached through the numpy chain in its source layout equals
the MONAI chain on a C-ordered copy."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from medssl.config import PreprocessConfig
from medssl.demo.dicom_writer import write_series
from medssl.ingest.decode import load_image
from medssl.ingest.manifest import build_manifest, read_manifest
from medssl.preprocess.arrays import every_nth, fast_chain, memory_order

from dicom_cohorts import oblique_affine, real_volume

pytestmark = pytest.mark.timeout(120)


def _series(tmp_path: Path, slopes=None, deflate_slice: int | None = None):
    """nibabel's real T1 as an oblique CT series; slice k optionally rescaled by slopes[k], one slice
    optionally re-encoded Deflated Explicit VR (outside the fast reader's lane: pydicom decodes it)."""
    vol, affine = real_volume()
    paths = write_series(vol, oblique_affine(affine), tmp_path / "dcm" / "s", patient_name="A^B", patient_id="P1",
                         modality="CT", rescale=(1.0, -1024.0), shuffle_names=True, rng=np.random.default_rng(0))
    for k, path in enumerate(paths):
        if slopes is None and k != deflate_slice:
            continue
        ds = pydicom.dcmread(path)
        if slopes is not None:
            ds.RescaleSlope, ds.RescaleIntercept = f"{slopes[k]:.4f}", f"{-1000 - k}"
        if k == deflate_slice:
            ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)
    build_manifest(tmp_path / "dcm", tmp_path / "m.csv", salt="t", workers=1, progress=False)
    df, meta = read_manifest(tmp_path / "m.csv")
    assert len(df) == 1
    return df.iloc[0], Path(meta["root"]), paths


def _pydicom_volume(paths) -> np.ndarray:
    """(X, Y, Z) float64 modality values, slice by slice through pydicom (the independent reader)."""
    planes = []
    for path in paths:
        ds = pydicom.dcmread(path)
        planes.append(ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    return np.stack(planes, axis=-1).transpose(1, 0, 2)


@pytest.mark.parametrize("case", ["uniform", "per-slice slopes", "one pydicom slice"])
def test_stacked_series_equals_pydicom_per_slice(tmp_path, case):
    slopes = np.linspace(0.5, 2.0, real_volume()[0].shape[2]) if case == "per-slice slopes" else None
    row, root, paths = _series(tmp_path, slopes=slopes, deflate_slice=7 if case == "one pydicom slice" else None)
    loaded = load_image(row, root)
    assert loaded.array.dtype == np.float32 and loaded.array.shape == (1, *real_volume()[0].shape)
    in_manifest_order = [root / rel for rel in str(row["paths"]).split("|")]   # sorted along the slice normal
    assert sorted(in_manifest_order) == sorted(paths)
    np.testing.assert_allclose(loaded.array[0], _pydicom_volume(in_manifest_order), rtol=1e-6, atol=1e-3)


def test_percentile_sample_is_the_c_order_sample_whatever_the_layout():
    vol = np.ascontiguousarray(real_volume()[0], dtype=np.float32)[None]   # (1, 33, 41, 25)
    views = {"C": vol, "F": np.asfortranarray(vol), "flipped": vol[:, ::-1, :, ::-1],
             "stack view": np.ascontiguousarray(vol[0].transpose(2, 1, 0)).transpose(2, 1, 0)[None]}
    for name, view in views.items():
        for step in (1, 2, 5, 7, 25, 64):
            np.testing.assert_array_equal(every_nth(view, step), np.ascontiguousarray(view).ravel()[::step],
                                          err_msg=f"{name}, step {step}")


def test_memory_order_follows_the_fastest_axis():
    vol = np.ascontiguousarray(real_volume()[0][None])
    assert memory_order(vol) == "C"
    assert memory_order(np.asfortranarray(vol)) == "F"
    assert memory_order(np.ascontiguousarray(vol[0].transpose(2, 1, 0)).transpose(2, 1, 0)[None]) == "F"


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_series_through_the_numpy_chain_in_source_layout_equals_the_monai_chain(tmp_path, modality):
    from medssl.preprocess.transforms import build_preprocess, make_input
    row, root, _ = _series(tmp_path)
    loaded = load_image(row, root)
    assert not loaded.array.flags.c_contiguous          # the stack's transposed view: no copy made yet
    for cfg in (PreprocessConfig(ct_window=(-1100.0, -700.0)), PreprocessConfig(size=[40, 30, 24])):
        got, _ = fast_chain(loaded.array, loaded.affine, modality, "MONOCHROME2", cfg)
        expected = build_preprocess(cfg)(make_input(np.ascontiguousarray(loaded.array), loaded.affine, modality,
                                                    "MONOCHROME2"))["image"].numpy()
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_slices_the_index_parsed_are_not_parsed_again_and_a_rewritten_one_is(tmp_path, monkeypatch):
    """After build_manifest in this process, load_image parses only the first and last slice of a series
    (their positions make the affine); a slice rewritten since the index (same size, other pixels) is parsed
    afresh, and every value equals a load with the table empty."""
    from medssl.ingest import decode
    from medssl.ingest.dicom import known
    row, root, paths = _series(tmp_path)
    parsed = []
    real_read = decode.read_slice
    monkeypatch.setattr(decode, "read_slice", lambda path: parsed.append(path) or real_read(path))
    with_table = load_image(row, root).array.copy()
    assert len(parsed) == 2
    in_order = [root / rel for rel in str(row["paths"]).split("|")]
    ds = pydicom.dcmread(in_order[5])
    ds.PixelData = (ds.pixel_array[::-1] + 1).astype(ds.pixel_array.dtype).tobytes()   # same size, new values
    ds.save_as(in_order[5], enforce_file_format=True)
    parsed.clear()
    rewritten = load_image(row, root).array
    assert len(parsed) == 3 and str(in_order[5]) in parsed
    np.testing.assert_array_equal(rewritten[0, :, :, 5], _pydicom_volume([in_order[5]])[:, :, 0])
    np.testing.assert_array_equal(np.delete(rewritten, 5, axis=3), np.delete(with_table, 5, axis=3))
    known.remember({})
    np.testing.assert_array_equal(load_image(row, root).array, rewritten)
