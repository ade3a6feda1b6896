"""The embedded demo cohort: pseudo-subjects built offline from a real T1 brain MR, written like users' data.

Source anatomy (see ../shared/DATA.md): the ITK KmeansTest T1 (Debian `insighttoolkit5-examples`, with its
skull-strip map as brain mask) when installed, else nibabel's `tests/data/anatomical.nii` (always there with
nibabel; brain mask by thresholding), so the demo runs with pip packages alone.

Layout of `out/`:
    images/dicom/PA000001/ST000001/SE000001/IM*.dcm   DICOM subjects, the DICOMDIR-style export layout (LPS slice
                                                      order, shuffled file names); identifiers only in the headers
    images/bids/sub-0002/ses-<date>/anat/sub-0002_ses-<date>_T1w.nii.gz   NIfTI subjects, BIDS layout, with the
                                                      .json sidecar dcm2niix writes with `-ba n` (holds PatientID)
    images/README.txt, images/.DS_Store, one zero-byte .dcm in a DICOM series folder   (junk: must be skipped)
    labels.csv     patient_id,label — 1 = lesion (the rare condition), 0 = normal. patient_id is the DICOM
                   PatientID for DICOM subjects and the BIDS subject folder ("sub-0002") for NIfTI subjects,
                   since a NIfTI file carries no patient (the manifest groups NIfTI files by their sub- folder)
    truth.csv      one row per image: path, format, lesion centre (voxel) and volume; never given to models
    .medssl-demo.json   the settings it was built with (a rebuild with the same settings is skipped)
Patient names / ids / birth dates are fake but realistic, so pseudonymisation in the manifest is exercised.
"""
from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from medssl.config import DemoConfig
from medssl.errors import DataError
from medssl.demo.subject import Subject
from medssl.ui import progress_bar
from medssl.demo.files import write_dicom_study, write_junk, write_nifti_study
from medssl.demo.lesions import (Anatomy, Deformation, insert_lesion, lesion_mask, random_pose, random_subject_shape,
                            scanner_effects)
from medssl.ingest.csv_safe import write_csv

ITK_T1 = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data/KmeansTest_T1UCharRaw.nii.gz")
ITK_BRAIN = ITK_T1.with_name("KmeansTest_T1RawSkullStrip.nii.gz")
FORMAT_VERSION = 2          # 2: brain-extracted ITK T1, larger hypointense lesions
SURNAMES = ["SMITH", "GARCIA", "MULLER", "ROSSI", "NOWAK", "TANAKA", "OKAFOR", "DUBOIS", "HANSEN", "SILVA",
            "KOWALSKI", "NGUYEN", "JOHANSSON", "MARTIN", "BROWN", "FISCHER", "LOPEZ", "WILSON", "KIM", "SINGH"]
GIVEN = ["ANNA", "JOHN", "MARIA", "PETER", "YUKI", "CHIDI", "CLAIRE", "LARS", "ANA", "PIOTR", "LINH", "ERIK",
         "SOPHIE", "JAMES", "LENA", "CARLOS", "EMMA", "MIN", "PRIYA", "DAVID"]


@dataclass
class DemoCohort:
    folder: Path            # the images folder to index (give it to the manifest)
    labels_csv: Path        # patient_id,label
    truth_csv: Path         # per image ground truth (lesion location), for tests and inspection
    n_subjects: int
    n_positive: int
    n_images: int
    n_dicom: int            # subjects written as DICOM series
    source: str             # which real anatomy the cohort derives from


# ------------------------------------------------------------------------------------------ anatomy
@lru_cache(maxsize=2)
def load_anatomy(source: str = "auto") -> Anatomy:
    """"itk" | "nibabel" | "auto" (ITK T1 when installed, else nibabel's anatomical.nii)."""
    if source == "itk" or (source == "auto" and ITK_T1.is_file() and ITK_BRAIN.is_file()):
        if not ITK_T1.is_file():
            raise DataError("the ITK T1 example volume is not installed", where=str(ITK_T1),
                            fix="apt-get install insighttoolkit5-examples, or use source='nibabel'")
        image = nib.as_closest_canonical(nib.load(ITK_T1))
        brain = np.asarray(nib.as_closest_canonical(nib.load(ITK_BRAIN)).dataobj) > 0
        # brain-extracted (skull-stripped, one voxel of margin), as research pipelines hand brain MR over:
        # with the scalp kept, its bright fat rim dominated what a CNN trained on a few dozen labels learned
        stripped = np.asarray(image.dataobj, np.float32) * ndimage.binary_dilation(brain, iterations=1)
        return Anatomy(stripped.astype(np.float32), image.affine, brain, "itk-kmeans-t1-brain")
    from nibabel.testing import data_path
    image = nib.as_closest_canonical(nib.load(Path(data_path) / "anatomical.nii"))
    volume = np.asarray(image.dataobj, np.float32)
    return Anatomy(volume, image.affine, _threshold_brain(volume), "nibabel-anatomical")


def _threshold_brain(volume: np.ndarray) -> np.ndarray:
    """Head mask without a segmentation: above 1/3 of the robust maximum, largest component, holes filled."""
    mask = volume > np.percentile(volume, 99) / 3
    labels, n = ndimage.label(ndimage.binary_opening(mask, iterations=1))
    if n:
        mask = labels == 1 + int(np.argmax(ndimage.sum(mask, labels, range(1, n + 1))))
    return ndimage.binary_fill_holes(mask)


def output_grid(anatomy: Anatomy, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(affine (4,4) RAS, points (3, size³) world mm): an isotropic cube over the brain plus 15 % margin."""
    idx = np.argwhere(anatomy.brain)
    corners = anatomy.affine[:3, :3] @ np.stack([idx.min(0), idx.max(0)]).T + anatomy.affine[:3, 3:4]
    centre, edge = corners.mean(1), float(np.ptp(corners, axis=1).max()) * 1.15
    spacing = round(edge / size, 2)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = centre - spacing * (size - 1) / 2
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij")).reshape(3, -1)
    return affine, affine[:3, :3] @ grid + affine[:3, 3:4]


# ----------------------------------------------------------------------------------------- subjects
def plan_subjects(cfg: DemoConfig, second_study_fraction: float) -> list[Subject]:
    """Who is positive, who is DICOM, who has two studies: exact counts, positions shuffled by the seed."""
    rng = np.random.default_rng([cfg.seed, 0])
    n = cfg.subjects
    n_pos = min(n - 1, max(1, round(n * cfg.positive_fraction)))
    positive = np.zeros(n, bool)
    positive[rng.permutation(n)[:n_pos]] = True
    dicom = np.zeros(n, bool)
    dicom[rng.permutation(n)[:round(n * cfg.dicom_fraction)]] = True
    two = np.zeros(n, bool)
    two[rng.permutation(n)[:round(n * second_study_fraction)]] = True
    ids = rng.choice(9_000_000, size=n, replace=False) + 1_000_000  # unique 7-digit medical record numbers
    return [Subject(i, f"MRN{ids[i]}", f"{rng.choice(SURNAMES)}^{rng.choice(GIVEN)}",
                    f"{rng.integers(1940, 2005)}{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}",
                    str(rng.choice(["F", "M"])), bool(positive[i]), bool(dicom[i]), 1 + int(two[i]))
            for i in range(n)]


def render_subject(anatomy: Anatomy, grid_points: np.ndarray, size: int, seed: int, index: int,
                   lesion: bool, n_studies: int = 1) -> list[dict]:
    """Volumes (size³, RAS voxel order, float32) of one subject's studies, with the warped lesion mask.

    Separate random streams for anatomy, lesion and each study: switching the lesion off changes nothing
    else, which is what lets a test compare the same subject with and without it. Every subject gets a
    lesion *site* drawn the same way ("site"); only positives get the lesion there, so a 2D slice chosen
    through the site tells nothing about the label.
    """
    linear, elastic = random_subject_shape(np.random.default_rng([seed, 1, index]))
    lesion_rng = np.random.default_rng([seed, 2, index])
    soft_box, box, centre_mm = lesion_mask(anatomy, lesion_rng)
    volume = insert_lesion(anatomy, soft_box, box, lesion_rng) if lesion else anatomy.volume
    soft = np.zeros(anatomy.volume.shape, np.float32)
    soft[box] = soft_box
    inv = np.linalg.inv(anatomy.affine)
    studies = []
    for study in range(n_studies):
        study_rng = np.random.default_rng([seed, 3, index, study])
        rot, shift = random_pose(study_rng)
        warp = Deformation(grid_points.mean(1), linear, elastic, rot, shift)
        src = inv[:3, :3] @ warp(grid_points) + inv[:3, 3:4]  # (3, N) source voxel coordinates
        out = ndimage.map_coordinates(volume, src, order=1, mode="constant").reshape((size,) * 3)
        image = scanner_effects(out, grid_points, study_rng, gain=study_rng.uniform(3.0, 5.0),
                                level=_bright_level(anatomy))
        site = ndimage.map_coordinates(soft, src, order=1).reshape((size,) * 3)
        studies.append({"image": image, "lesion": site if lesion else None, "site": site,
                        "centre_mm": centre_mm if lesion else None, "date": 20200101 + 10000 * study
                        + int(study_rng.integers(1, 12)) * 100 + int(study_rng.integers(1, 28))})
    return studies


def _bright_level(anatomy: Anatomy) -> float:
    """99th percentile of the lesion-free brain: the noise reference of every study."""
    return float(np.percentile(anatomy.volume[anatomy.brain], 99))


def _study_rows(subject: Subject, studies: list[dict], affine: np.ndarray, folder: Path, seed: int) -> list[dict]:
    rows = []
    for number, study in enumerate(studies):
        grid = study.get("affine", affine)  # 2D slices carry their own
        if subject.dicom:
            path, _ = write_dicom_study(study["image"], grid, folder, subject, number, study["date"], seed)
        else:
            path, _ = write_nifti_study(study["image"], grid, folder, subject, study["date"],
                                        radiological=subject.index % 2 == 1)
        fmt = "nifti" if not subject.dicom else "dicom-2d" if "slice" in study else "dicom-series"
        row = {"path": path.relative_to(folder).as_posix(), "patient_id": subject.label_id,
               "format": fmt, "study": number,
               "label": int(subject.positive), "slice": study.get("slice", ""), "lesion_ml": 0.0,
               "lesion_centre_mm": ""}
        if study["lesion"] is not None:
            voxel_ml = abs(np.linalg.det(grid[:3, :3])) / 1000.0
            row["lesion_ml"] = round(float(study["lesion"].sum()) * voxel_ml, 3)
            row["lesion_centre_mm"] = " ".join(f"{v:.1f}" for v in study["centre_mm"])
        rows.append(row)
    return rows


def _reusable(out: Path, settings: dict) -> bool:
    marker = out / ".medssl-demo.json"
    return marker.is_file() and json.loads(marker.read_text()).get("settings") == settings


def _prepare(out: Path) -> Path:
    """Empty `out/images`, but only if medssl wrote it: never delete a user's folder by mistake."""
    images = out / "images"
    if out.exists() and any(out.iterdir()) and not (out / ".medssl-demo.json").is_file():
        raise DataError("the demo output folder exists and was not written by medssl", where=str(out),
                        fix="choose an empty or new folder for data.demo.out / `medssl demo-data OUT`")
    shutil.rmtree(images, ignore_errors=True)
    (out / ".medssl-demo.json").unlink(missing_ok=True)
    images.mkdir(parents=True)
    return images


def build_demo_cohort(cfg: DemoConfig, out: Path | None = None, *, source: str = "auto",
                      second_study_fraction: float = 0.2, spatial_dims: int = 3, workers: int | None = None,
                      progress: bool = True) -> DemoCohort:
    """Write the demo cohort under `out` (default cfg.out); reuse it when built before with the same settings.

    `spatial_dims=2` writes, per study, the axial slice through the subject's lesion site (the lesion for
    positives; the same kind of site for negatives) as a one-slice DICOM series or an (X, Y, 1) NIfTI.
    `workers` processes draw and write subjects in parallel (default: up to 8 CPU cores); the result is
    the same for any number of workers, because every subject has its own random streams.
    """
    out = Path(out or cfg.out)
    anatomy = load_anatomy(source)
    settings = {**cfg.model_dump(mode="json", exclude={"out"}), "source": anatomy.name,
                "second_study_fraction": second_study_fraction, "spatial_dims": spatial_dims,
                "format_version": FORMAT_VERSION}
    if spatial_dims not in (2, 3):
        raise DataError(f"spatial_dims must be 2 or 3, not {spatial_dims}", where="build_demo_cohort")
    if not _reusable(out, settings):
        images = _prepare(out)
        subjects = plan_subjects(cfg, second_study_fraction)
        jobs = [(subject, source, cfg.size, cfg.seed, images, spatial_dims) for subject in subjects]
        rows = [row for rows in _run_jobs(jobs, workers, progress) for row in rows]
        write_junk(images, subjects)
        labels = pd.DataFrame({"patient_id": [s.label_id for s in subjects],
                               "label": [int(s.positive) for s in subjects]})
        write_csv(labels, out / "labels.csv")
        write_csv(pd.DataFrame(rows), out / "truth.csv")
        (out / ".medssl-demo.json").write_text(json.dumps({"settings": settings}, indent=2))  # last: marks complete
    truth = pd.read_csv(out / "truth.csv")
    patients = truth.drop_duplicates("patient_id")
    return DemoCohort(out / "images", out / "labels.csv", out / "truth.csv", len(patients),
                      int(patients["label"].sum()), len(truth), int((patients["format"] != "nifti").sum()),
                      anatomy.name)


def _subject_job(job: tuple) -> list[dict]:
    """Draw and write one subject (runs in a worker process; the anatomy is loaded once per process)."""
    subject, source, size, seed, images, spatial_dims = job
    anatomy = load_anatomy(source)
    affine, points = output_grid(anatomy, size)
    studies = render_subject(anatomy, points, size, seed, subject.index, subject.positive, subject.n_studies)
    if spatial_dims == 2:
        studies = [axial_slice(study, affine) for study in studies]
    return _study_rows(subject, studies, affine, images, seed)


def axial_slice(study: dict, affine: np.ndarray) -> dict:
    """The 2D variant: the axial slice (X, Y, 1) through the centre of the lesion site, with its own affine."""
    k = int(np.argmax(study["site"].sum(axis=(0, 1))))
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ [0, 0, k] + affine[:3, 3]
    one = {key: (value[:, :, k:k + 1] if isinstance(value, np.ndarray) and value.ndim == 3 else value)
           for key, value in study.items()}
    return {**one, "affine": shifted, "slice": k}


def _run_jobs(jobs: list[tuple], workers: int | None, progress: bool) -> list[list[dict]]:
    workers = min(workers or min(8, os.cpu_count() or 1), max(1, len(jobs) // 8))  # small cohorts: no pool
    bar = progress_bar("subjects", enabled=progress)
    with bar:
        task = bar.add_task("demo subjects", total=len(jobs))
        if workers <= 1:
            return [_tick(bar, task, _subject_job(job)) for job in jobs]
        with ProcessPoolExecutor(workers) as pool:
            return [_tick(bar, task, rows) for rows in pool.map(_subject_job, jobs, chunksize=4)]


def _tick(bar, task, rows: list[dict]) -> list[dict]:
    bar.advance(task)
    return rows



