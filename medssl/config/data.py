"""Where the images come from and how the manifest is built."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from medssl.config.base import Section


class DemoConfig(Section):
    """The embedded cohort, built offline from real anatomy shipped in packages (medssl/demo.py)."""
    subjects: int = Field(60, ge=4)
    positive_fraction: float = Field(0.1, gt=0, lt=1)
    dicom_fraction: float = Field(0.5, ge=0, le=1, description="share of subjects written as DICOM series")
    size: int = Field(48, ge=16, description="edge of the cubic pseudo-subject volume, voxels")
    seed: int = 0
    out: Path = Path(".medssl/demo_data")
    masks: bool = Field(False, description="segmentation demo (demo/seg_cohort.py): every subject gets a lesion "
                                           "and its mask, joined through a 'mask' column of labels.csv")


class DataConfig(Section):
    folder: Path | None = None
    labels: Path | None = None
    demo: DemoConfig | None = None
    nifti_modality: str = Field("MR", description="modality recorded for NIfTI files, which carry none")

    @model_validator(mode="after")
    def _one_source(self):
        if self.folder is None and self.demo is None:
            raise ValueError("give data.folder (your images) or data.demo (the embedded demo cohort)")
        return self


class ManifestConfig(Section):
    out: Path = Path("data_manifests/dataset.csv")
    join_on: Literal["auto", "patient_id", "study_uid", "series_uid", "path"] = "auto"
    workers: int | None = Field(None, ge=1)
    max_image_mb: float = Field(4096, gt=0, description="refuse images whose declared size exceeds this")
    salt_env: str = Field("MEDSSL_SALT", description="environment variable holding the pseudonymisation salt")
