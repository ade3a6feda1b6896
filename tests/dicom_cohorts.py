"""Test-side builders of DICOM / NIfTI folders derived from real anatomy (nibabel's anatomical.nii T1,
pydicom-data's Enhanced MR and radiograph). Each builder returns what it wrote so tests can assert on it."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from medssl.demo.dicom_writer import affine_to_dicom, format_ds, write_image_2d, write_series

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
ITK_T1 = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data/KmeansTest_T1UCharRaw.nii.gz")


def real_volume() -> tuple[np.ndarray, np.ndarray]:
    """nibabel's anatomical.nii: a real T1 (33, 41, 25) int16 and its RAS affine."""
    img = nib.load(NIBABEL_DATA / "anatomical.nii")
    return np.asarray(img.dataobj).astype(np.int16), img.affine.copy()


def rotation(degrees_xyz) -> np.ndarray:
    """4x4 rotation about the world x, then y, then z axes."""
    out = np.eye(4)
    for axis, deg in enumerate(degrees_xyz):
        c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
        r = np.eye(3)
        a, b = [i for i in range(3) if i != axis]
        r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
        out[:3, :3] = r @ out[:3, :3]
    return out


def oblique_affine(affine: np.ndarray, degrees_xyz=(17.0, -11.0, 23.0)) -> np.ndarray:
    return rotation(degrees_xyz) @ affine


def _rewrite(path: Path, **attrs) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)


def write_messy_folder(root: Path, rng: np.random.Generator) -> dict:
    """A folder with every kind of mess the manifest must sort out. Returns the expectations."""
    vol, affine = real_volume()
    vol = vol[:, :, :12]
    root.mkdir(parents=True, exist_ok=True)
    people = {"good": ("Smith^Alice", "PID-ALICE-01"), "dup": ("Jones^Bob", "PID-BOB-02"),
              "gap": ("Brown^Carol", "PID-CAROL-03"), "cr": ("White^Dan", "PID-DAN-04")}
    study = {k: generate_uid() for k in people}
    series = {k: generate_uid() for k in people}
    # a clean oblique series whose names are shuffled, plus a localizer in the same series
    good = write_series(vol, oblique_affine(affine), root / "p1" / "t1", patient_name=people["good"][0],
                        patient_id=people["good"][1], study_uid=study["good"], series_uid=series["good"],
                        shuffle_names=True, rng=rng)
    scout = write_series(vol[:, :, :1], rotation((90, 0, 0)) @ affine, root / "p1" / "scout",
                         patient_name=people["good"][0], patient_id=people["good"][1], study_uid=study["good"],
                         extra={"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]})
    # a series with one file copied under a second name (same SOPInstanceUID)
    dup = write_series(vol, affine, root / "p2" / "ct", patient_name=people["dup"][0], patient_id=people["dup"][1],
                       study_uid=study["dup"], series_uid=series["dup"], modality="CT", rescale=(1.0, -1024.0))
    (root / "p2" / "ct" / "copy_of_slice.dcm").write_bytes(dup[4].read_bytes())
    # a series with a missing slice
    gap = write_series(vol, affine, root / "p3" / "mr", patient_name=people["gap"][0], patient_id=people["gap"][1],
                       study_uid=study["gap"], series_uid=series["gap"])
    gap[6].unlink()
    radiograph = np.clip(vol[:, :, 6], 0, None).astype(np.uint16)
    cr = write_image_2d(radiograph, root / "p4" / "chest.dcm", patient_name=people["cr"][0], patient_id=people["cr"][1],
                        study_uid=study["cr"], series_uid=series["cr"], modality="CR", photometric="MONOCHROME1")
    nii = root / "nifti" / "sub-07" / "anat.nii.gz"
    nii.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(vol.astype(np.float32), affine), nii)
    photo = root / "photos" / "slice.png"  # a 2D raster image (RGB, like a fundus or dermoscopy photograph)
    photo.parent.mkdir()
    grey = (np.clip(vol[:, :, 6], 0, None) / vol.max() * 255).astype(np.uint8).T  # (rows, columns)
    Image.fromarray(np.stack([grey, grey, grey], axis=-1)).save(photo)
    (root / "notes.txt").write_text("not an image\n")
    (root / "empty.dcm").write_bytes(b"")
    return {"people": people, "study": study, "series": series, "good": good, "scout": scout, "dup": dup,
            "gap": gap, "cr": cr, "nifti": nii, "photo": photo}


def write_enhanced(vol: np.ndarray, affine: np.ndarray, path: Path, *, patient_id: str, frame_order=None,
                   rescale=(1.0, 0.0)) -> Path:
    """An Enhanced MR (multi-frame) object; frames stored in `frame_order` (shuffled tests frame sorting)."""
    geo, n = affine_to_dicom(affine), vol.shape[2]
    order = list(range(n)) if frame_order is None else list(frame_order)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.PatientName, ds.PatientID, ds.Modality = "Enhanced^Test", patient_id, "MR"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid(), generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.SharedFunctionalGroupsSequence = Sequence([_shared_groups(geo, rescale)])
    frames = []
    for k in order:
        item = Dataset()
        item.PlanePositionSequence = Sequence([Dataset()])
        item.PlanePositionSequence[0].ImagePositionPatient = format_ds(geo["origin"] + k * geo["slice_step"])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.NumberOfFrames, ds.Rows, ds.Columns = n, vol.shape[1], vol.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    pixels = np.stack([vol[:, :, k].T for k in order]).astype("<i2")  # (F, Rows, Columns)
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _shared_groups(geo: dict, rescale) -> Dataset:
    """Orientation, pixel measures and rescale shared by every frame of an Enhanced object."""
    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([Dataset()])
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = format_ds(geo["iop"])
    shared.PixelMeasuresSequence = Sequence([Dataset()])
    shared.PixelMeasuresSequence[0].PixelSpacing = format_ds(geo["pixel_spacing"])
    shared.PixelMeasuresSequence[0].SliceThickness = format_ds(np.linalg.norm(geo["slice_step"]))[0]
    shared.PixelValueTransformationSequence = Sequence([Dataset()])
    shared.PixelValueTransformationSequence[0].RescaleSlope = format_ds(rescale[0])[0]
    shared.PixelValueTransformationSequence[0].RescaleIntercept = format_ds(rescale[1])[0]
    shared.PixelValueTransformationSequence[0].RescaleType = "US"
    return shared
