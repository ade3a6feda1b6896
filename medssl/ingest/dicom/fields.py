"""The one header dict the rest of medssl uses, from either source of DICOM attributes: a pydicom Dataset or
the fast reader's fields (parse.py); both answer `.get(keyword)`."""
from __future__ import annotations

import math
import os

import numpy as np

from medssl.ingest.dicom.parse import IMPLICIT_LE


def _floats(value, n: int) -> list[float] | None:
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def _orientation(value) -> list[float] | None:
    """IOP only if its two cosines are unit length and orthogonal (a zero or garbled IOP has no geometry)."""
    iop = _floats(value, 6)
    if iop is None:
        return None
    row, col = iop[:3], iop[3:]
    unit = abs(math.hypot(*row) - 1) < 1e-2 and abs(math.hypot(*col) - 1) < 1e-2
    return iop if unit and abs(sum(a * b for a, b in zip(row, col))) < 1e-2 else None


def _spacing(value) -> list[float] | None:
    spacing = _floats(value, 2)
    return spacing if spacing is not None and min(spacing) > 0 else None


def _group_value(item, seq: str, attr: str):
    """Attribute `attr` inside functional group `seq` of one frame item, or None."""
    inner = getattr(item, seq, None) if item is not None else None
    return getattr(inner[0], attr, None) if inner else None


def enhanced_geometry(ds, h: dict) -> None:
    """Orientation and spacing from the shared (or first per-frame) functional groups; one position per frame."""
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    frames = ds.get("PerFrameFunctionalGroupsSequence") or []
    first = frames[0] if frames else None

    def pick(seq, attr):
        value = _group_value(shared, seq, attr)
        return value if value is not None else _group_value(first, seq, attr)

    # functional groups first; top-level attributes (stripped or hybrid files) as the fallback
    h["iop"] = _orientation(pick("PlaneOrientationSequence", "ImageOrientationPatient")) or h["iop"]
    h["spacing"] = _spacing(pick("PixelMeasuresSequence", "PixelSpacing")) or h["spacing"]
    h["thickness"] = (_number(pick("PixelMeasuresSequence", "SpacingBetweenSlices"))
                      or _number(ds.get("SpacingBetweenSlices"))
                      or _number(pick("PixelMeasuresSequence", "SliceThickness")) or h["thickness"])
    ipps = [_floats(_group_value(f, "PlanePositionSequence", "ImagePositionPatient"), 3) for f in frames]
    h["frame_ipps"] = ipps if ipps and all(p is not None for p in ipps) and len(ipps) == h["frames"] else None
    planes = {tuple(np.round(o, 3)) for f in frames
              if (o := _orientation(_group_value(f, "PlaneOrientationSequence", "ImageOrientationPatient")))}
    h["mixed_planes"] = len(planes) > 1  # e.g. a multi-stack localizer: one orientation cannot describe it


def _number(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) and out > 0 else None


def _as_list(value) -> list:
    """Multi-valued attributes: pydicom gives a MultiValue, the fast parser a list or a lone string."""
    if value is None or value == "":
        return []
    return [value] if isinstance(value, (str, bytes)) else list(value)


def basic_fields(ds, path: str, modality: str, ts: str | None = None) -> dict:
    """The header dict from anything with `.get(keyword)`: a pydicom Dataset or dicom_parse's fields."""
    ts = ts or getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None) or IMPLICIT_LE
    return {
        "kind": "dicom", "size": os.path.getsize(path), "modality": modality,
        "sop_uid": str(ds.get("SOPInstanceUID", "") or ""), "series_uid": str(ds.get("SeriesInstanceUID", "") or ""),
        "study_uid": str(ds.get("StudyInstanceUID", "") or ""),
        "patient_id": str(ds.get("PatientID", "") or "").strip(),  # pydicom keeps leading spaces, the fast parser not
        "body_part": str(ds.get("BodyPartExamined", "") or ""),
        "image_type": [str(v).upper() for v in _as_list(ds.get("ImageType"))],
        "rows": int(ds.get("Rows", 0) or 0), "cols": int(ds.get("Columns", 0) or 0),
        "frames": int(ds.get("NumberOfFrames", 1) or 1), "spp": int(ds.get("SamplesPerPixel", 1) or 1),
        "bits": int(ds.get("BitsAllocated", 16) or 16),
        "photometric": str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2"), "ts": str(ts),
        "iop": _orientation(ds.get("ImageOrientationPatient")), "ipp": _floats(ds.get("ImagePositionPatient"), 3),
        "spacing": _spacing(ds.get("PixelSpacing")) or _spacing(ds.get("ImagerPixelSpacing")),
        "thickness": _number(ds.get("SliceThickness")),
    }


def rescale_of(item) -> tuple[float, float]:
    """(slope, intercept) of a dataset, the fast reader's fields or a functional-group item; identity when absent."""
    slope, intercept = item.get("RescaleSlope", 1.0), item.get("RescaleIntercept", 0.0)
    return float(slope if slope not in (None, "") else 1.0), float(intercept if intercept not in (None, "") else 0.0)
