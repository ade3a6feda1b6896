"""Write numpy volumes as valid DICOM files (used by the demo cohort generator, tests and benchmarks).

Conventions, the same ones the reader (medssl.data.dicom / medssl.data.io) undoes:

* A volume is an array `(X, Y, Z)`: i runs along a DICOM row (= the column index), j runs down the
  rows, k runs over slices. One slice's DICOM pixel matrix is therefore `volume[:, :, k].T`, shape (Rows, Columns).
* `affine` maps voxel (i, j, k, 1) to RAS+ world millimetres (the NIfTI / nibabel convention).
  DICOM patient coordinates are LPS+: x grows to the patient's Left, y to Posterior, z to Head.
  RAS -> LPS negates the first two world axes: `LPS = diag(-1, -1, 1) @ RAS`.
* ImageOrientationPatient = (row cosine, column cosine) in LPS: the row cosine is the world direction
  in which the *column index* grows (affine column 0), the column cosine the direction in which the
  *row index* grows (affine column 1). Any rotation (oblique planes) is carried exactly this way.
* PixelSpacing = [spacing between rows, spacing between columns] = [|affine[:, 1]|, |affine[:, 0]|]
  (note the order: the first value belongs to j, not i).
* ImagePositionPatient of slice k = LPS position of voxel (0, 0, k), the centre of the first pixel sent.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

# SOP classes of the single-frame objects medssl writes
SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
    "MG": "1.2.840.10008.5.1.4.1.1.1.2",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "OT": "1.2.840.10008.5.1.4.1.1.7",
}
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def format_ds(values) -> list[str]:
    """Decimal strings are limited to 16 characters; format each number to fit (1e-9 mm is plenty).
    Rounding first also dodges a formatter corner case (9.99999999999999 -> 17 characters)."""
    out = []
    for value in np.atleast_1d(values):
        text = format_number_as_ds(round(float(value), 9))
        out.append(text if len(text) <= 16 else f"{float(value):.10g}")
    return out


def affine_to_dicom(affine: np.ndarray) -> dict:
    """RAS voxel->world affine -> IOP (6 cosines, LPS), pixel spacing [row, col], slice step vector (LPS),
    and the LPS origin (centre of voxel (0, 0, 0))."""
    a = np.asarray(affine, dtype=float)
    lps = RAS_TO_LPS @ a[:3, :3]  # (3, 3) columns: world steps of i, j, k in LPS
    col_step, row_step, slice_step = lps[:, 0], lps[:, 1], lps[:, 2]
    dx, dy = np.linalg.norm(col_step), np.linalg.norm(row_step)
    return {
        "iop": np.concatenate([col_step / dx, row_step / dy]),
        "pixel_spacing": np.array([dy, dx]),
        "slice_step": slice_step,
        "origin": RAS_TO_LPS @ a[:3, 3],
    }


def _new_dataset(modality: str, patient_name: str, patient_id: str, study_uid: str, series_uid: str,
                 series_description: str) -> Dataset:
    """Patient / study / series modules and file meta shared by every file of a series."""
    sop_class = SOP_CLASS.get(modality, SOP_CLASS["OT"])
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = sop_class
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName, ds.PatientID = patient_name, patient_id
    ds.PatientBirthDate, ds.PatientSex = "", ""
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", ""
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.SeriesNumber, ds.SeriesDescription = modality, 1, series_description
    return ds


def _set_pixels(ds: Dataset, pixels: np.ndarray, photometric: str) -> None:
    """Image pixel module for a (Rows, Columns[, 3]) matrix of int16, uint16 or uint8."""
    dtype = np.dtype(pixels.dtype)
    if dtype not in (np.int16, np.uint16, np.uint8):
        raise ValueError(f"pixel dtype must be int16, uint16 or uint8, got {dtype}")
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0  # RGBRGB... the order numpy's (R, C, 3) layout already has
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if dtype == np.int16 else 0
    ds.PixelData = np.ascontiguousarray(pixels).astype(dtype.newbyteorder("<"), copy=False).tobytes()


def _file_names(n: int, shuffle: bool, rng) -> list[str]:
    """Slice file names; shuffled names make sure readers never rely on name order."""
    order = np.arange(n)
    if shuffle:
        order = (rng or np.random.default_rng()).permutation(n)
    return [f"IM{int(o):05d}.dcm" for o in order]


def write_series(volume: np.ndarray, affine: np.ndarray, out_dir: Path, *, patient_name: str, patient_id: str,
                 study_uid: str | None = None, series_uid: str | None = None, modality: str = "MR",
                 series_description: str = "", rescale: tuple[float, float] | None = None,
                 shuffle_names: bool = False, rng: np.random.Generator | None = None,
                 extra: dict | None = None) -> list[Path]:
    """Write `volume` (X, Y, Z) int16 as one single-frame DICOM file per slice into `out_dir`.

    `rescale` = (slope, intercept): stored value v means slope * v + intercept (CT always gets the tags,
    default (1, 0)). `extra` sets further attributes on every slice (keyword -> value), e.g. ImageType.
    Returns the written paths in slice order k = 0..Z-1 (whatever their shuffled names).
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"volume must be (X, Y, Z), got shape {volume.shape}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    geo = affine_to_dicom(affine)
    base = _new_dataset(modality, patient_name, patient_id, study_uid or generate_uid(),
                        series_uid or generate_uid(), series_description)
    base.FrameOfReferenceUID = generate_uid()
    names = _file_names(volume.shape[2], shuffle_names, rng)
    paths = []
    for k in range(volume.shape[2]):
        ds = _slice_dataset(base, volume[:, :, k], geo, k, modality, rescale)
        for keyword, value in (extra or {}).items():
            setattr(ds, keyword, value)
        path = out_dir / names[k]
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _slice_dataset(base: Dataset, plane: np.ndarray, geo: dict, k: int, modality: str,
                   rescale: tuple[float, float] | None) -> Dataset:
    """One slice: copy the shared modules, add its own UID, position and pixels."""
    ds = base.copy()
    ds.file_meta = base.file_meta.copy()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = k + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    position = geo["origin"] + k * geo["slice_step"]
    ds.ImagePositionPatient = format_ds(position)
    ds.ImageOrientationPatient = format_ds(geo["iop"])
    ds.PixelSpacing = format_ds(geo["pixel_spacing"])
    thickness = float(np.linalg.norm(geo["slice_step"])) or 1.0
    ds.SliceThickness = ds.SpacingBetweenSlices = format_ds(thickness)[0]
    normal = np.cross(geo["iop"][:3], geo["iop"][3:])
    ds.SliceLocation = format_ds(position @ normal)[0]
    if rescale is not None or modality == "CT":
        slope, intercept = rescale or (1.0, 0.0)
        ds.RescaleSlope, ds.RescaleIntercept = format_ds(slope)[0], format_ds(intercept)[0]
        ds.RescaleType = "HU" if modality == "CT" else "US"
    _set_pixels(ds, np.asarray(plane, dtype=np.int16).T, "MONOCHROME2")  # (Rows=Y, Columns=X)
    return ds


def write_image_2d(image: np.ndarray, out_path: Path, *, patient_name: str, patient_id: str,
                   study_uid: str | None = None, series_uid: str | None = None, modality: str = "CR",
                   series_description: str = "", pixel_spacing: tuple[float, float] = (1.0, 1.0),
                   photometric: str = "MONOCHROME2", extra: dict | None = None) -> Path:
    """Write a single-frame projection image (CR / DX / ...) from `image` (X, Y) or (X, Y, 3) for RGB.

    Grey images take int16 / uint16 / uint8; RGB takes uint8. `pixel_spacing` is (row spacing, column
    spacing) in mm, DICOM order. No patient geometry is written (projection images have none).
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"image must be (X, Y) or (X, Y, 3), got shape {image.shape}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ds = _new_dataset(modality, patient_name, patient_id, study_uid or generate_uid(),
                      series_uid or generate_uid(), series_description)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PixelSpacing = ds.ImagerPixelSpacing = format_ds(pixel_spacing)
    pixels = np.swapaxes(image, 0, 1)  # (X, Y[, 3]) -> (Rows=Y, Columns=X[, 3])
    _set_pixels(ds, pixels, "RGB" if image.ndim == 3 else photometric)
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    ds.save_as(out_path, enforce_file_format=True)
    return out_path
