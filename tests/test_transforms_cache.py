"""Preprocessing chain and persistent cache on real anatomy (nibabel's T1 `anatomical.nii`, LAS, 2 mm)."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy.ndimage import map_coordinates

from medssl.config import PreprocessConfig
from medssl.preprocess.cache import VolumeCache, settings_key
from medssl.preprocess.transforms import build_preprocess, make_input
from medssl.errors import DataError

T1 = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"


def t1() -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(T1)
    return np.asarray(img.dataobj, dtype=np.float32), img.affine   # (33, 41, 25), LAS


def run(cfg: PreprocessConfig, array, affine, modality="MR", photometric="MONOCHROME2"):
    out = build_preprocess(cfg)(make_input(array, affine, modality, photometric))["image"]
    return out.numpy(), out.affine.numpy()


# ---------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("spacing", [[3.0, 3.0, 3.0], [1.3, 2.7, 1.1]])
def test_orientation_and_spacing_match_an_independent_resampling(spacing):
    data, affine = t1()
    low, high = float(data.min()) - 1, float(data.max()) + 1     # a CT "window" wider than the data: linear
    out, out_affine = run(PreprocessConfig(spacing=spacing, ct_window=(low, high)), data[None], affine, "CT")
    assert nib.aff2axcodes(out_affine) == ("R", "A", "S")
    assert np.allclose(np.abs(np.diag(out_affine)[:3]), spacing)
    # the grid spans the input's voxel centres: n = round(extent / spacing) + 1 (extent = (n_in - 1) * 2 mm)
    expected = [round((n - 1) * 2.0 / s) + 1 for n, s in zip(data.shape, spacing)]
    assert list(out.shape) == [1, *expected]
    # every output voxel holds what trilinear interpolation of the source gives at the same world point
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in out.shape[1:]], indexing="ij"), -1).reshape(-1, 3)
    world = ijk @ out_affine[:3, :3].T + out_affine[:3, 3]
    src = (world - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    inside = np.all((src >= 0) & (src <= np.array(data.shape) - 1), axis=1)
    assert inside.mean() > 0.9
    reference = map_coordinates(data, src[inside].T, order=1)
    got = out.reshape(-1)[inside] * (high - low) + low
    assert np.abs(got - reference).max() < 1e-5 * (high - low)


def test_orientation_alone_flips_the_left_right_axis_and_ct_window_is_exact():
    data, affine = t1()                                          # LAS: axis 0 runs right -> left
    out, out_affine = run(PreprocessConfig(ct_window=(100.0, 500.0)), data[None], affine, "CT")
    expected = np.clip((data[::-1] - 100.0) / 400.0, 0, 1)
    np.testing.assert_allclose(out[0], expected, atol=1e-6)
    assert out_affine[0, 0] > 0 and out.min() == 0.0 and out.max() == 1.0


def test_mr_percentile_scaling_is_exact():
    data, affine = t1()
    out, _ = run(PreprocessConfig(mr_percentiles=(2.0, 98.0)), data[None], affine, "MR")
    low, high = np.percentile(data, [2.0, 98.0])
    np.testing.assert_allclose(out[0], np.clip((data[::-1] - low) / (high - low), 0, 1), atol=1e-6)


def test_radiograph_minmax_monochrome1_inverted_and_2d_pixel_order_kept():
    data, affine = t1()
    slice_2d = data[:, :, 12]                                     # (33, 41): a real 2D image
    out, _ = run(PreprocessConfig(spatial_dims=2), slice_2d[None], affine, "CR", "MONOCHROME1")
    span = slice_2d.max() - slice_2d.min()
    np.testing.assert_allclose(out[0], 1.0 - (slice_2d - slice_2d.min()) / span, atol=1e-6)
    ct, _ = run(PreprocessConfig(spatial_dims=2, ct_window=(0.0, 1000.0)), slice_2d[None], affine, "CT",
                "MONOCHROME1")
    np.testing.assert_allclose(ct[0], np.clip(slice_2d / 1000.0, 0, 1), atol=1e-6)   # HU: never inverted


def test_2d_spacing_and_size_and_dimension_rules():
    data, affine = t1()
    out, out_affine = run(PreprocessConfig(spatial_dims=2, spacing=[1.0, 4.0], size=[48, 16]),
                          data[:, :, 12][None], affine)
    assert out.shape == (1, 48, 16) and np.allclose(np.diag(out_affine)[:2], [1.0, 4.0])
    # slices_from_3d: volumes stay 3D, spacing/size in-plane, the slice axis keeps its 25 native slices
    cfg = PreprocessConfig(spatial_dims=2, spacing=[1.0, 1.0], size=[64, 64], slices_from_3d=True)
    out, out_affine = run(cfg, data[None], affine)
    assert out.shape == (1, 64, 64, 25) and np.allclose(np.diag(out_affine)[:3], [1.0, 1.0, 2.0])
    out, _ = run(PreprocessConfig(spatial_dims=2), data[:, :, 12:13][None], affine)   # (X, Y, 1) -> 2D
    assert out.shape == (1, 33, 41)
    with pytest.raises(DataError, match="slices_from_3d"):
        run(PreprocessConfig(spatial_dims=2), data[None], affine)
    with pytest.raises(DataError, match="2D image .* cannot enter a 3D pipeline"):
        run(PreprocessConfig(spatial_dims=3), data[:, :, 12][None], affine)


def test_foreground_crop_then_pad_to_size_3d():
    data, affine = t1()
    framed = np.pad(data, 6, constant_values=data.min())          # the head inside an empty field of view
    cropped, _ = run(PreprocessConfig(foreground_crop=True), framed[None], affine)
    full, _ = run(PreprocessConfig(), framed[None], affine)
    assert all(c <= f - 10 for c, f in zip(cropped.shape[1:], full.shape[1:]))
    assert (full > 0.05).sum() == (cropped > 0.05).sum()          # no foreground voxel lost
    out, _ = run(PreprocessConfig(foreground_crop=True, size=[40, 40, 40]), framed[None], affine)
    assert out.shape == (1, 40, 40, 40)


# ---------------------------------------------------------------------------------------- cache
@dataclass
class Loaded:
    array: np.ndarray
    affine: np.ndarray
    modality: str
    photometric: str


DECODES: list[str] = []


def nifti_loader(row, root):
    """Stands in for medssl.ingest.decode.load_image on NIfTI (same fields), and counts decodes."""
    DECODES.append(row["image_id"])
    img = nib.load(Path(root) / row["paths"])
    return Loaded(np.asarray(img.dataobj, dtype=np.float32)[None], img.affine, row["modality"], row["photometric"])


@pytest.fixture()
def folder(tmp_path) -> tuple[Path, pd.DataFrame]:
    """Three real images (the T1, a brighter copy, a 2D slice stored as (X, Y, 1)) and one corrupt file."""
    data, affine = t1()
    shutil.copy(T1, tmp_path / "a.nii")
    nib.save(nib.Nifti1Image(data * 1.7 + 20, affine), tmp_path / "b.nii.gz")
    nib.save(nib.Nifti1Image(data[:, :, 10:11], affine), tmp_path / "c.nii.gz")
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti file")
    rows = [{"image_id": f"img-{n}", "patient_id": f"pat-{n}", "format": "nifti", "paths": p, "modality": "MR",
             "photometric": "MONOCHROME2", "spatial_dims": 3}
            for n, p in (("a", "a.nii"), ("b", "b.nii.gz"), ("c", "c.nii.gz"), ("bad", "bad.nii.gz"))]
    DECODES.clear()
    return tmp_path, pd.DataFrame(rows)


def test_cache_builds_once_reuses_and_invalidates(folder, tmp_path):
    root, df = folder
    cfg = PreprocessConfig(spacing=[3.0, 3.0, 3.0], size=[24, 24, 24])
    cache = VolumeCache(tmp_path / "cache", cfg, root, load=nifti_loader)
    failures = cache.build(df, root, workers=1)
    assert set(failures) == {"img-bad", "img-c"}                    # corrupt file; a 2D image in a 3D pipeline
    assert "2D image" in failures["img-c"]
    assert sorted(DECODES) == ["img-a", "img-b", "img-bad", "img-c"]
    arr = cache.get("img-a")
    assert isinstance(arr, np.memmap) and arr.dtype == np.float16 and arr.shape == (1, 24, 24, 24)
    assert cache.shape("img-a") == (1, 24, 24, 24) and not cache.has("img-c")
    DECODES.clear()
    again = VolumeCache(tmp_path / "cache", cfg, root, load=nifti_loader)      # a later run: nothing decoded
    assert again.build(df[df.image_id != "img-bad"], root, workers=1).keys() == {"img-c"}
    assert DECODES == ["img-c"]                                        # only the failed one is retried
    DECODES.clear()
    os.utime(root / "b.nii.gz", ns=(1, 1))                            # source changed: rebuilt
    again.build(df.iloc[:2], root, workers=1)
    assert DECODES == ["img-b"]
    DECODES.clear()
    other = VolumeCache(tmp_path / "cache", PreprocessConfig(spacing=[4.0, 4.0, 4.0]), root, load=nifti_loader)
    assert other.dir != cache.dir and settings_key(cfg) == cache.dir.parent.name
    other.build(df.iloc[:2], root, workers=1)
    assert sorted(DECODES) == ["img-a", "img-b"]                       # changed setting: decoded again
    assert np.asarray(cache.get("img-a")).shape != np.asarray(other.get("img-a")).shape


def test_cached_values_equal_the_chain_within_float16(folder, tmp_path):
    root, df = folder
    cfg = PreprocessConfig(spatial_dims=2, spacing=[2.0, 2.0], slices_from_3d=True)
    cache = VolumeCache(tmp_path / "cache", cfg, root, load=nifti_loader)
    assert cache.build(df.iloc[:3], root, workers=2) == {}              # 2 processes; 3D and (X, Y, 1) rows
    assert cache.get("img-a").ndim == 4 and cache.get("img-c").shape == (1, 33, 41)
    assert cache.get("img-a")[..., 7].flags.f_contiguous          # axial slices stored contiguously
    data, affine = t1()
    expected, _ = run(cfg, data[None], affine)
    assert np.abs(np.asarray(cache.get("img-a"), np.float32) - expected).max() < 5e-4
    with pytest.raises(DataError, match="not in the preprocessing cache"):
        cache.get("img-bad")


def test_missing_source_is_a_failure_not_a_crash(folder, tmp_path):
    root, df = folder
    cache = VolumeCache(tmp_path / "cache", PreprocessConfig(), root, load=nifti_loader)
    assert cache.build(df.iloc[:1], root, workers=1) == {}
    (root / "a.nii").unlink()
    failures = cache.build(df.iloc[:1], root, workers=1)
    assert "missing" in failures["img-a"] and not cache.has("img-a")


# ---------------------------------------------------------------------------------------- through io.py
def test_real_dicom_through_io_ct_window_and_monochrome1_radiograph(tmp_path, monkeypatch):
    """CT_small (CT, HU = raw - 1024) and RG1_UNCI (CR chest radiograph, MONOCHROME1) decoded by
    medssl.ingest.decode.load_image inside the cache; values checked against pydicom's own pixels."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file
    import medssl.ingest.decode as io
    rows = []
    for image_id, name, modality, photometric in (("img-ct", "CT_small.dcm", "CT", "MONOCHROME2"),
                                                  ("img-cr", "RG1_UNCI.dcm", "CR", "MONOCHROME1")):
        source = get_testdata_file(name)
        if source is None:
            pytest.skip(f"{name} not installed (pip install pydicom-data)")
        shutil.copy(source, tmp_path / name)
        rows.append({"image_id": image_id, "patient_id": "pat-1", "format": "dicom-2d", "paths": name,
                     "modality": modality, "photometric": photometric, "spatial_dims": 2})
    decodes = []
    real_load = io.load_image
    monkeypatch.setattr(io, "load_image", lambda row, root: decodes.append(row["image_id"]) or real_load(row, root))
    cfg = PreprocessConfig(spatial_dims=2, ct_window=(-200.0, 300.0))
    cache = VolumeCache(tmp_path / "cache", cfg, tmp_path)
    assert cache.build(pd.DataFrame(rows), tmp_path, workers=1) == {} and len(decodes) == 2
    ds = pydicom.dcmread(tmp_path / "CT_small.dcm")
    hu = ds.pixel_array.astype(np.float32).T * float(ds.RescaleSlope) + float(ds.RescaleIntercept)   # (X, Y)
    np.testing.assert_allclose(cache.get("img-ct")[0], np.clip((hu + 200.0) / 500.0, 0, 1), atol=3e-4)
    raw = pydicom.dcmread(tmp_path / "RG1_UNCI.dcm").pixel_array.astype(np.float32).T
    expected = 1.0 - (raw - raw.min()) / (raw.max() - raw.min())          # inverted: bone bright
    np.testing.assert_allclose(cache.get("img-cr")[0], expected, atol=5e-4)
    VolumeCache(tmp_path / "cache", cfg, tmp_path).build(pd.DataFrame(rows), tmp_path, workers=1)
    assert len(decodes) == 2                                              # second build: all from cache


def crashing_loader(row, root):
    """A decoder that kills its process (as a segfaulting codec or the OOM killer would) on one image."""
    if row["image_id"] == "img-bad":
        os._exit(1)
    return nifti_loader(row, root)


def test_a_dying_worker_loses_only_its_own_image(folder, tmp_path):
    root, df = folder
    cache = VolumeCache(tmp_path / "cache", PreprocessConfig(), root, load=crashing_loader)
    failures = cache.build(df[df.image_id != "img-c"], root, workers=2)
    assert list(failures) == ["img-bad"] and "worker process died" in failures["img-bad"]
    assert cache.has("img-a") and cache.has("img-b")


# ---------------------------------------------------------------------------------------- cache identity
def _same_layout(root: Path, data: np.ndarray, affine: np.ndarray) -> pd.DataFrame:
    """A BIDS-like dataset: sub-01/anat/sub-01_T1w.nii, whose image id (a hash of the relative path with the
    same salt) is the same in every dataset of that layout."""
    (root / "sub-01" / "anat").mkdir(parents=True)
    nib.save(nib.Nifti1Image(data, affine), root / "sub-01" / "anat" / "sub-01_T1w.nii")
    return pd.DataFrame([{"image_id": "img-same", "patient_id": "pat-1", "format": "nifti", "modality": "MR",
                          "paths": "sub-01/anat/sub-01_T1w.nii", "photometric": "MONOCHROME2"}])


def test_two_datasets_with_one_layout_never_share_entries(tmp_path):
    data, affine = t1()
    cfg = PreprocessConfig(size=[24, 24, 24])
    first = _same_layout(tmp_path / "site_a", data, affine)
    second = _same_layout(tmp_path / "site_b", data[::-1, ::-1].copy(), affine)   # other anatomy, same names
    cache_a = VolumeCache(tmp_path / "cache", cfg, tmp_path / "site_a", load=nifti_loader)
    assert cache_a.build(first, workers=1) == {}
    cache_b = VolumeCache(tmp_path / "cache", cfg, tmp_path / "site_b", load=nifti_loader)
    assert cache_b.build(second, workers=1) == {}
    expected_a, _ = run(cfg, data[None], affine)
    expected_b, _ = run(cfg, data[::-1, ::-1][None], affine)
    assert np.abs(expected_a - expected_b).max() > 0.5                  # the two images really differ
    reopened_a = VolumeCache(tmp_path / "cache", cfg, tmp_path / "site_a", load=nifti_loader)
    np.testing.assert_allclose(np.asarray(reopened_a.get("img-same"), np.float32), expected_a[...], atol=5e-4)
    np.testing.assert_allclose(np.asarray(cache_b.get("img-same"), np.float32), expected_b, atol=5e-4)
    DECODES.clear()
    assert reopened_a.build(first, workers=1) == {} and DECODES == []  # site A's entry is still its own
    with pytest.raises(DataError, match="holds the images of"):
        reopened_a.build(second, tmp_path / "site_b", workers=1)


def test_source_rewritten_in_place_with_its_old_mtime_is_rebuilt(tmp_path):
    """Same size, same mtime (as `cp -p`, rsync -t or an editor restoring times would leave it): rebuilt."""
    data, affine = t1()
    cfg = PreprocessConfig(size=[24, 24, 24])
    df = _same_layout(tmp_path / "site", data, affine)
    path = tmp_path / "site" / df.loc[0, "paths"]
    cache = VolumeCache(tmp_path / "cache", cfg, tmp_path / "site", load=nifti_loader)
    assert cache.build(df, workers=1) == {}
    before = path.stat()
    nib.save(nib.Nifti1Image(data[::-1].copy(), affine), path)           # same shape and dtype: same size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    DECODES.clear()
    assert VolumeCache(tmp_path / "cache", cfg, tmp_path / "site", load=nifti_loader).build(df, workers=1) == {}
    assert DECODES == ["img-same"]
    expected, _ = run(cfg, data[::-1][None], affine)
    np.testing.assert_allclose(np.asarray(cache.get("img-same"), np.float32), expected, atol=5e-4)


def test_evaluate_never_writes_into_the_training_cache(tmp_path, monkeypatch):
    """`medssl evaluate` on a manifest preprocesses into the workdir's external cache; the training cache
    (preprocess.cache_dir) of the same dataset is left exactly as it was."""
    import medssl.evaluate.predict as predict_module
    from medssl.config import PipelineConfig
    from medssl.ingest.manifest import build_manifest
    from medssl.pipeline import commands
    data, affine = t1()
    (tmp_path / "images").mkdir()
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "images" / "t1.nii.gz")
    (tmp_path / "labels.csv").write_text("path,label\nt1.nii.gz,1\n")
    build_manifest(tmp_path / "images", tmp_path / "m.csv", labels=tmp_path / "labels.csv", join_on="path", salt="s",
                   workers=1, progress=False)
    cfg = PipelineConfig.model_validate({"name": "x", "workdir": str(tmp_path / "work"),
                                         "data": {"folder": str(tmp_path / "images")},
                                         "preprocess": {"cache_dir": str(tmp_path / "train_cache"),
                                                        "size": [24, 24, 24]}})
    used = {}
    monkeypatch.setattr(predict_module, "evaluate_model", lambda model, cache, *a, **k: used.update(cache=cache) or {})
    monkeypatch.setattr(commands, "open_tracker", lambda cfg: None)
    commands.evaluate_external(cfg, "unused", tmp_path / "m.csv", tmp_path / "out")
    assert used["cache"].has(str(pd.read_csv(tmp_path / "m.csv")["image_id"][0]))
    assert (tmp_path / "work") in used["cache"].dir.parents
    assert not (tmp_path / "train_cache").exists()


# ---------------------------------------------------------------------------------------- manifest paths
def test_manifest_paths_leaving_the_root_are_refused_and_never_read(tmp_path):
    """A manifest from elsewhere names files outside its root (`..`, an absolute path, a link out): each is a
    DataError naming the row, the outside file is never decoded, and the good image beside them is cached."""
    from medssl.ingest.decode import load_image
    data, affine = t1()
    root, outside = tmp_path / "dataset", tmp_path / "private"
    root.mkdir(), outside.mkdir()
    nib.save(nib.Nifti1Image(data, affine), root / "good.nii.gz")
    nib.save(nib.Nifti1Image(data, affine), outside / "secret.nii.gz")   # a real, decodable image
    (root / "link.nii.gz").symlink_to(outside / "secret.nii.gz")
    escapes = {"img-dots": "../private/secret.nii.gz", "img-abs": str(outside / "secret.nii.gz"),
               "img-link": "link.nii.gz"}
    rows = [{"image_id": i, "patient_id": "pat-1", "format": "nifti", "paths": p, "modality": "MR",
             "photometric": "MONOCHROME2"} for i, p in {"img-good": "good.nii.gz", **escapes}.items()]
    for row in rows[1:]:
        with pytest.raises(DataError, match="outside the dataset folder") as err:
            load_image(row, root)
        assert row["image_id"] in err.value.where
    assert load_image(rows[0], root).array.shape == (1, *data.shape)
    cache = VolumeCache(tmp_path / "cache", PreprocessConfig(size=[16, 16, 16]), root)
    failures = cache.build(pd.DataFrame(rows), workers=1)
    assert set(failures) == set(escapes) and all("outside" in r for r in failures.values())
    assert cache.has("img-good")


# ---------------------------------------------------------------------------------------- the numpy chain
ITK_T1 = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data/KmeansTest_T1UCharRaw.nii.gz")


def _real_volumes():
    """nibabel's T1 (LAS: a flip), ITK's T1 (LSA: a flip and a permutation), and nibabel's T1 with its axes
    reordered to PIL with every axis reversed (the same anatomy, another storage order)."""
    data, affine = t1()
    yield "nibabel-LAS", data, affine
    if ITK_T1.is_file():
        img = nib.load(ITK_T1)
        yield "itk-LSA", np.asarray(img.dataobj, dtype=np.float32), img.affine
    order = (1, 2, 0)
    stored = data.transpose(order)[::-1, ::-1, ::-1]
    moved = affine[:, list(order) + [3]].copy()
    moved[:3, 3] = affine[:3, :3] @ (np.array(data.shape) - 1) + affine[:3, 3]   # the old last voxel is first
    moved[:3, :3] *= -1
    yield "permuted-PIL", np.ascontiguousarray(stored), moved


@pytest.mark.parametrize("cfg", [PreprocessConfig(), PreprocessConfig(size=[40, 36, 24]),
                                 PreprocessConfig(size=[31, 61, 23]),   # odd crops of even axes: centre rule
                                 PreprocessConfig(spatial_dims=2, slices_from_3d=True, size=[30, 50])],
                         ids=["native", "pad-and-crop", "odd-sizes", "slices_from_3d"])
@pytest.mark.parametrize("modality", ["MR", "CT"])
def test_numpy_chain_equals_the_monai_chain_on_real_volumes(cfg, modality):
    from medssl.preprocess.arrays import fast_chain, fast_chain_applies
    assert fast_chain_applies(cfg)
    if modality == "CT":
        cfg = cfg.model_copy(update={"ct_window": (20.0, 120.0)})
    for name, data, affine in _real_volumes():
        expected, expected_affine = run(cfg, data[None], affine, modality)
        got, got_affine = fast_chain(data[None], affine, modality, "MONOCHROME2", cfg)
        assert got.dtype == np.float32 and got.shape == expected.shape, name
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(got_affine, expected_affine, atol=1e-9, err_msg=name)
        assert nib.aff2axcodes(got_affine) == ("R", "A", "S")


def test_numpy_chain_equals_the_monai_chain_on_real_2d_images(tmp_path):
    """pydicom's CT_small (CT window) and RG1_UNCI (CR, MONOCHROME1: min-max, inverted), decoded by
    load_image, plus a 2D slice stored (X, Y, 1); native and padded/cropped sizes."""
    from pydicom.data import get_testdata_file
    from medssl.ingest.decode import load_image
    from medssl.preprocess.arrays import fast_chain
    images = []
    for name, modality, photometric in (("CT_small.dcm", "CT", "MONOCHROME2"), ("RG1_UNCI.dcm", "CR", "MONOCHROME1")):
        source = get_testdata_file(name)
        if source is None:
            pytest.skip(f"{name} not installed (pip install pydicom-data)")
        shutil.copy(source, tmp_path / name)
        row = {"image_id": name, "format": "dicom-2d", "paths": name, "modality": modality,
               "photometric": photometric}
        loaded = load_image(row, tmp_path)
        images.append((name, loaded.array, loaded.affine, modality, photometric))
    data, affine = t1()
    images.append(("slice", data[None, :, :, 12:13], affine, "MR", "MONOCHROME2"))
    for cfg in (PreprocessConfig(spatial_dims=2, ct_window=(-200.0, 300.0)),
                PreprocessConfig(spatial_dims=2, size=[300, 40])):
        for name, array, affine, modality, photometric in images:
            expected, expected_affine = run(cfg, array, affine, modality, photometric)
            got, got_affine = fast_chain(array, affine, modality, photometric, cfg)
            assert got.shape == expected.shape, name
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6, err_msg=name)
            np.testing.assert_allclose(got_affine, expected_affine, atol=1e-9, err_msg=name)


def test_the_cache_stores_the_numpy_chain_as_float16_without_importing_monai(tmp_path):
    """A fresh process builds a no-resample cache: MONAI is never imported, and the stored arrays are the
    MONAI chain's values to float16 rounding."""
    import subprocess
    import sys
    data, affine = t1()
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "t1.nii.gz")
    script = f"""
import sys, pandas as pd
from medssl.config import PreprocessConfig
from medssl.preprocess.cache import VolumeCache
rows = [{{"image_id": "img-a", "format": "nifti", "paths": "t1.nii.gz", "modality": "MR", "photometric": ""}}]
cache = VolumeCache({str(tmp_path / 'cache')!r}, PreprocessConfig(size=[24, 40, 24]), {str(tmp_path)!r})
assert cache.build(pd.DataFrame(rows), workers=1) == {{}}
print("monai" in sys.modules, cache.path("img-a"))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr[-2000:]
    imported, stored = done.stdout.split()
    assert imported == "False"
    expected, _ = run(PreprocessConfig(size=[24, 40, 24]), data[None], affine)
    cached = np.load(stored)
    # stored in the layout the source came in (a NIfTI is Fortran-ordered): a plain C or F array either way
    assert cached.dtype == np.float16 and (cached.flags.c_contiguous or cached.flags.f_contiguous)
    np.testing.assert_array_equal(cached, expected.astype(np.float16))


def test_predict_never_writes_into_the_training_cache(tmp_path, monkeypatch):
    """`medssl predict` indexes a folder and preprocesses it into the workdir's external cache."""
    import medssl.evaluate.predict as predict_module
    from medssl.config import PipelineConfig
    from medssl.pipeline import commands
    data, affine = t1()
    (tmp_path / "images").mkdir()
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "images" / "t1.nii.gz")
    cfg = PipelineConfig.model_validate({"name": "x", "workdir": str(tmp_path / "work"),
                                         "data": {"folder": str(tmp_path / "images")},
                                         "preprocess": {"cache_dir": str(tmp_path / "train_cache"),
                                                        "size": [24, 24, 24]}})
    used = {}

    def fake_predict(model, cache, df, out, **kwargs):
        used["cache"] = cache
        return pd.DataFrame({"image_id": df["image_id"], "score": 0.5})

    monkeypatch.setattr(predict_module, "predict", fake_predict)
    monkeypatch.setattr(commands, "open_tracker", lambda cfg: type("T", (), {"tracking_uri": None})())
    monkeypatch.setenv("MEDSSL_SALT", "s")
    commands.predict_folder(cfg, "unused", tmp_path / "images", tmp_path / "pred.csv")
    assert used["cache"].has(str(pd.read_csv(tmp_path / "pred.csv")["image_id"][0]))
    assert (tmp_path / "work") in used["cache"].dir.parents
    assert not (tmp_path / "train_cache").exists()
