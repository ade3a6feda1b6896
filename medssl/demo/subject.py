"""One pseudo-subject of the demo cohort: its identifiers (as a hospital would store them) and its plan."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Subject:
    index: int
    patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    positive: bool
    dicom: bool
    n_studies: int

    @property
    def label_id(self) -> str:
        """The id a labels CSV uses: PatientID for DICOM, the BIDS subject label for NIfTI."""
        return self.patient_id if self.dicom else self.bids

    @property
    def bids(self) -> str:
        return f"sub-{self.index + 1:04d}"
