"""The demo cohort: exact labels, real lesions, correct NIfTI / DICOM geometry (dcm2niix as the judge)."""
from __future__ import annotations

import shutil
import subprocess

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from medssl.config import DemoConfig
from medssl.demo.cohort import build_demo_cohort, load_anatomy, output_grid, plan_subjects, render_subject
from medssl.errors import DataError
from medssl.demo.lesions import lesion_mask

CFG = DemoConfig(subjects=8, size=24, positive_fraction=0.25, dicom_fraction=0.5, seed=3)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return build_demo_cohort(CFG, tmp_path_factory.mktemp("demo") / "out", progress=False)


def rendered(patient_id: str, study: int = 0, lesion: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """What the generator drew for this patient, (int16 image in RAS voxel order, its affine)."""
    subject = next(s for s in plan_subjects(CFG, 0.2) if s.label_id == patient_id)
    anatomy = load_anatomy()
    affine, points = output_grid(anatomy, CFG.size)
    studies = render_subject(anatomy, points, CFG.size, CFG.seed, subject.index,
                             subject.positive if lesion is None else lesion, subject.n_studies)
    return np.clip(np.rint(studies[study]["image"]), 0, 32767).astype(np.int16), affine


def canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    image = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    return np.asarray(image.dataobj), image.affine


def test_labels_counts_and_layout(cohort):
    labels = pd.read_csv(cohort.labels_csv, dtype={"patient_id": str})
    truth = pd.read_csv(cohort.truth_csv)
    assert list(labels.columns) == ["patient_id", "label"] and set(labels["label"]) == {0, 1}
    assert len(labels) == labels["patient_id"].nunique() == 8
    assert cohort.n_positive == labels["label"].sum() == 2          # round(8 × 0.25), exactly
    assert cohort.n_dicom == 4 and cohort.n_images == len(truth) == 8 + round(8 * 0.2)
    assert (truth.groupby("patient_id")["study"].count() == 2).sum() == 2   # two studies: MICLe pairs
    folders = {p.name for kind in ("dicom", "bids") for p in (cohort.folder / kind).iterdir()}
    assert len(folders) == 8 and {i for i in labels["patient_id"] if i.startswith("sub-")} <= folders
    assert not any("MRN" in str(p) for p in cohort.folder.rglob("*"))  # identifiers live in headers, not paths
    assert (cohort.folder / "README.txt").is_file() and (cohort.folder / ".DS_Store").is_file()
    assert len([p for p in cohort.folder.rglob("*.dcm") if p.stat().st_size == 0]) == 1


def test_same_seed_same_cohort_other_seed_other_cohort(cohort, tmp_path):
    again = build_demo_cohort(CFG, tmp_path / "again", progress=False)
    assert pd.read_csv(again.labels_csv).equals(pd.read_csv(cohort.labels_csv))
    truth = pd.read_csv(cohort.truth_csv)
    for rel in truth.loc[truth["format"] == "nifti", "path"]:
        a, b = nib.load(cohort.folder / rel), nib.load(again.folder / rel)
        assert np.array_equal(a.dataobj, b.dataobj) and np.array_equal(a.affine, b.affine)
    rel = truth.loc[truth["format"] == "dicom-series", "path"].iloc[0]

    def pixels(root):
        slices = [pydicom.dcmread(p) for p in (root / rel).glob("*.dcm") if p.stat().st_size]
        return sorted((ds.InstanceNumber, ds.pixel_array.tobytes()) for ds in slices)

    assert pixels(cohort.folder) == pixels(again.folder)
    other = build_demo_cohort(CFG.model_copy(update={"seed": 4}), tmp_path / "other", progress=False)
    assert set(pd.read_csv(other.labels_csv)["patient_id"]) != set(pd.read_csv(cohort.labels_csv)["patient_id"])


def test_lesion_changes_only_the_lesion_and_by_a_visible_amount(cohort):
    truth = pd.read_csv(cohort.truth_csv)
    patient = truth.loc[truth["label"] == 1, "patient_id"].iloc[0]
    subject = next(s for s in plan_subjects(CFG, 0.2) if s.label_id == patient)
    anatomy = load_anatomy()
    _, points = output_grid(anatomy, CFG.size)
    with_lesion = render_subject(anatomy, points, CFG.size, CFG.seed, subject.index, True)[0]
    without = render_subject(anatomy, points, CFG.size, CFG.seed, subject.index, False)[0]
    mask = with_lesion["lesion"]
    assert (mask > 0.5).sum() >= 3                                  # several voxels even at 24³
    assert np.array_equal(with_lesion["image"][mask == 0], without["image"][mask == 0])
    core = mask > 0.5
    relative = np.abs(with_lesion["image"][core] - without["image"][core]).mean() / without["image"][core].mean()
    assert relative > 0.4                                           # 70-95 % darker, blurred at the edge


def test_lesions_lie_inside_the_brain_at_varying_places():
    anatomy = load_anatomy()
    centres = []
    for seed in range(6):
        soft, box, centre = lesion_mask(anatomy, np.random.default_rng(seed))
        assert soft.max() > 0.9 and not (soft * ~anatomy.brain[box]).any()
        centres.append(centre)
    assert len({tuple(np.round(c)) for c in centres}) == 6


def test_nifti_affine_and_voxels_match_what_was_drawn(cohort):
    truth = pd.read_csv(cohort.truth_csv)
    codes = set()
    for rel, patient, study in truth.loc[truth["format"] == "nifti", ["path", "patient_id", "study"]].values:
        image = nib.load(cohort.folder / rel)
        assert image.shape == (24, 24, 24) and image.get_data_dtype() == np.int16
        assert int(image.header["qform_code"]) == int(image.header["sform_code"]) == 1
        np.testing.assert_allclose(image.get_qform(), image.affine, atol=1e-4)
        codes.add(nib.aff2axcodes(image.affine))
        data, affine = canonical(np.asarray(image.dataobj), image.affine)
        expected, expected_affine = rendered(patient, study)
        assert np.array_equal(data, expected)
        np.testing.assert_allclose(affine, expected_affine, atol=1e-3)
        assert (cohort.folder / rel.replace(".nii.gz", ".json")).is_file()
    assert codes == {("R", "A", "S"), ("L", "A", "S")}            # both storage conventions occur


@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix not installed (apt-get install dcm2niix)")
def test_dicom_series_geometry_judged_by_dcm2niix(cohort, tmp_path):
    truth = pd.read_csv(cohort.truth_csv)
    rel, patient, study = truth.loc[truth["format"] == "dicom-series", ["path", "patient_id", "study"]].values[0]
    files = [p for p in (cohort.folder / rel).glob("*.dcm") if p.stat().st_size]
    first = pydicom.dcmread(files[0])
    assert len(files) == 24 and first.Modality == "MR" and first.PatientID == patient
    assert "^" in str(first.PatientName) and first.PatientBirthDate  # realistic identifiers to pseudonymise
    subprocess.run(["dcm2niix", "-z", "y", "-b", "n", "-f", "out", "-o", str(tmp_path), str(cohort.folder / rel)],
                   check=True, capture_output=True)
    judged = nib.load(tmp_path / "out.nii.gz")
    data, affine = canonical(np.asarray(judged.dataobj), judged.affine)
    expected, expected_affine = rendered(patient, study)
    assert np.array_equal(data, expected)
    np.testing.assert_allclose(affine, expected_affine, atol=1e-2)


def test_rebuild_is_skipped_and_foreign_folders_are_never_overwritten(cohort, tmp_path):
    stamp = cohort.labels_csv.stat().st_mtime_ns
    build_demo_cohort(CFG, cohort.labels_csv.parent, progress=False)
    assert cohort.labels_csv.stat().st_mtime_ns == stamp
    (tmp_path / "precious.txt").write_text("user data")
    with pytest.raises(DataError, match="not written by medssl"):
        build_demo_cohort(CFG, tmp_path, progress=False)
    assert (tmp_path / "precious.txt").is_file()


def test_pip_only_fallback_anatomy_builds_a_cohort(tmp_path):
    small = DemoConfig(subjects=4, size=16, positive_fraction=0.25, dicom_fraction=0.0, seed=1)
    cohort = build_demo_cohort(small, tmp_path / "nib", source="nibabel", progress=False)
    assert cohort.source == "nibabel-anatomical" and cohort.n_positive == 1 and cohort.n_dicom == 0
    image = nib.load(next(cohort.folder.rglob("*.nii.gz")))
    assert image.shape == (16, 16, 16) and np.asarray(image.dataobj).std() > 0


def test_2d_variant_slices_through_the_lesion_site(tmp_path):
    flat = DemoConfig(subjects=8, size=20, positive_fraction=0.25, dicom_fraction=0.5, seed=5)
    cohort = build_demo_cohort(flat, tmp_path / "flat", spatial_dims=2, progress=False)
    truth = pd.read_csv(cohort.truth_csv)
    assert set(truth["format"]) == {"nifti", "dicom-2d"} and truth["slice"].between(0, 19).all()
    assert (truth.loc[truth["label"] == 1, "lesion_ml"] > 0).all()    # positives: the lesion is in the slice
    for rel in truth.loc[truth["format"] == "nifti", "path"]:
        assert nib.load(cohort.folder / rel).shape == (20, 20, 1)
    for rel in truth.loc[truth["format"] == "dicom-2d", "path"]:
        files = [p for p in (cohort.folder / rel).glob("*.dcm") if p.stat().st_size]
        assert len(files) == 1 and pydicom.dcmread(files[0]).pixel_array.shape == (20, 20)
    again = build_demo_cohort(flat, tmp_path / "flat", progress=False)   # other settings: rebuilt, in 3D
    assert nib.load(next(again.folder.rglob("*.nii.gz"))).shape == (20, 20, 20)
