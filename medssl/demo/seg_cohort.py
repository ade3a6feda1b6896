"""The segmentation demo cohort: every pseudo-subject carries a lesion, and its mask is written beside it.

Same real anatomy, deformations and scanner effects as the classification demo (demo/cohort.py); the mask is
the warped lesion (partial-volume map > 0.5) on the image's own grid, stored in the image's own voxel order
(LPS for the DICOM series, LAS for "radiological" NIfTI), so the manifest finds it on the same grid. Layout:
`out/images/...` (as the demo), `out/masks/sub-NNNN_lesion.nii.gz`, and `out/labels.csv` with columns
path (the image file / series folder under images/), label (1: lesion) and mask (relative to the CSV).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from medssl.config import DemoConfig
from medssl.ingest.csv_safe import write_csv
from medssl.demo.cohort import (FORMAT_VERSION, _prepare, _reusable, axial_slice, load_anatomy, output_grid,
                                plan_subjects, render_subject)
from medssl.demo.files import write_dicom_study, write_nifti_study
from medssl.ui import progress_bar

MASK_LEVEL = 0.5   # the lesion's partial-volume map is the truth: a voxel is lesion when more than half is


def _in_stored_order(mask: np.ndarray, grid: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """The mask (on `grid`, RAS voxel order) resampled exactly onto the stored image's voxel order (`stored`
    affine; a flip of axes, so nearest neighbour moves no voxel)."""
    index = np.linalg.inv(grid) @ stored          # stored voxel index -> grid voxel index
    return ndimage.affine_transform(mask, index[:3, :3], offset=index[:3, 3], order=0, output_shape=mask.shape)


def _write_subject(subject, anatomy, points, affine, cfg: DemoConfig, images: Path, masks: Path,
                   spatial_dims: int) -> dict:
    (study,) = render_subject(anatomy, points, cfg.size, cfg.seed, subject.index, lesion=True, n_studies=1)
    if spatial_dims == 2:
        study = axial_slice(study, affine)
    grid = study.get("affine", affine)
    if subject.dicom:
        path, stored = write_dicom_study(study["image"], grid, images, subject, 0, study["date"], cfg.seed)
    else:
        path, stored = write_nifti_study(study["image"], grid, images, subject, study["date"],
                                         radiological=subject.index % 2 == 1)
    mask = _in_stored_order((study["lesion"] > MASK_LEVEL).astype(np.uint8), grid, stored)
    mask_path = masks / f"{subject.bids}_lesion.nii.gz"   # never the PatientID: file names reach the manifest
    nib.save(nib.Nifti1Image(mask, stored), mask_path)
    return {"path": path.relative_to(images).as_posix(), "label": 1,
            "mask": mask_path.relative_to(masks.parent).as_posix(), "lesion_voxels": int(mask.sum())}


def build_seg_demo(cfg: DemoConfig, out: Path | None = None, spatial_dims: int = 3, progress: bool = True) -> Path:
    """Write (or reuse) the cohort under `out`; returns the labels CSV."""
    out = Path(out or cfg.out)
    anatomy = load_anatomy("auto")
    settings = {**cfg.model_dump(mode="json", exclude={"out"}), "source": anatomy.name, "task": "segmentation",
                "spatial_dims": spatial_dims, "format_version": FORMAT_VERSION}
    if _reusable(out, settings):
        return out / "labels.csv"
    images = _prepare(out)
    masks = out / "masks"
    masks.mkdir(exist_ok=True)
    affine, points = output_grid(anatomy, cfg.size)
    subjects = [dataclasses.replace(s, positive=True) for s in plan_subjects(cfg, second_study_fraction=0.0)]
    rows = []
    with progress_bar("subjects", enabled=progress) as bar:
        task = bar.add_task("segmentation demo subjects", total=len(subjects))
        for subject in subjects:
            rows.append(_write_subject(subject, anatomy, points, affine, cfg, images, masks, spatial_dims))
            bar.advance(task)
    table = pd.DataFrame(rows)
    write_csv(table[["path", "label", "mask"]], out / "labels.csv")
    write_csv(table, out / "truth.csv")
    (out / ".medssl-demo.json").write_text(json.dumps({"settings": settings}, indent=2))   # last: complete
    return out / "labels.csv"
