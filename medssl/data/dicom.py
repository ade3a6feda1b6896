"""DICOM headers, geometry and series assembly.

Geometry conventions (the inverse of medssl.data.dicom_writer): DICOM positions are LPS+; an image's
row cosine (IOP[:3]) is the direction in which the column index i grows, the column cosine (IOP[3:]) the
direction in which the row index j grows; PixelSpacing is [between rows (j), between columns (i)].
Slices are ordered by the projection of ImagePositionPatient on the slice normal (row x column cosine),
never by InstanceNumber or file name. Affines returned here map (i, j, k) to RAS+ (NIfTI convention).
"""
from __future__ import annotations

import math
import os

import numpy as np
import pydicom

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


# ------------------------------------------------------------------------------------------ headers
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
    ts = ts or getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None) or pydicom.uid.ImplicitVRLittleEndian
    return {
        "kind": "dicom", "size": os.path.getsize(path), "modality": modality,
        "sop_uid": str(ds.get("SOPInstanceUID", "") or ""), "series_uid": str(ds.get("SeriesInstanceUID", "") or ""),
        "study_uid": str(ds.get("StudyInstanceUID", "") or ""), "patient_id": str(ds.get("PatientID", "") or ""),
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


# ------------------------------------------------------------------------------------------ geometry
def slice_normal(iop) -> np.ndarray:
    iop = np.asarray(iop, dtype=float)
    return np.cross(iop[:3], iop[3:])


def stack_affine(iop, first_ipp, spacing, step_lps) -> np.ndarray:
    """RAS affine of a stack: columns are the LPS steps of i, j, k turned into RAS.

    `spacing` is DICOM PixelSpacing [row spacing, column spacing]; `step_lps` the world step between
    consecutive slices (first to last over n-1, so a gantry tilt stays a shear)."""
    iop = np.asarray(iop, dtype=float)
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * spacing[1]
    lps[:3, 1] = iop[3:] * spacing[0]
    lps[:3, 2] = step_lps
    lps[:3, 3] = first_ipp
    return LPS_TO_RAS @ lps


def plane_affine(h: dict) -> np.ndarray:
    """Affine of one 2D image: its own plane if it has one, else an axial-like default at the origin."""
    spacing = h.get("spacing") or [1.0, 1.0]
    if h.get("iop") and h.get("ipp"):
        return stack_affine(h["iop"], h["ipp"], spacing, slice_normal(h["iop"]) * (h.get("thickness") or 1.0))
    return stack_affine([1, 0, 0, 0, 1, 0], [0, 0, 0], spacing, [0, 0, h.get("thickness") or 1.0])


def order_positions(iop, ipps) -> np.ndarray:
    """Indices that sort slice positions along the slice normal (ascending)."""
    distance = np.asarray(ipps, dtype=float) @ slice_normal(iop)
    return np.argsort(distance, kind="stable")


def spacing_problems(iop, ipps_sorted) -> list[str]:
    """Missing slices (a gap well above the usual step) and uneven spacing, in words."""
    distance = np.asarray(ipps_sorted, dtype=float) @ slice_normal(iop)
    gaps = np.diff(distance)
    if len(gaps) < 1:
        return []
    usual = float(np.median(gaps))
    problems = []
    missing = np.flatnonzero(gaps > 1.5 * usual)
    if missing.size:
        count = int(sum(round(gaps[m] / usual) - 1 for m in missing))
        problems.append(f"missing slices: about {count} missing after slice(s) {', '.join(map(str, missing[:5]))}")
    elif gaps.max() - gaps.min() > max(0.01, 0.01 * usual):
        problems.append(f"uneven slice spacing: {gaps.min():.3g}..{gaps.max():.3g} mm")
    return problems


# ------------------------------------------------------------------------------------------ assembly
# modalities whose single frames are projections or photographs: each file is one 2D image
PROJECTION = {"CR", "DX", "MG", "IO", "PX", "RF", "XA", "US", "ES", "XC", "SC", "OT", "GM", "SM", "OP"}


def _record(h: dict, fmt: str, paths: list[str], affine: np.ndarray, shape: list[int], spacing: list[float],
            problems: list[str]) -> dict:
    """One image as the manifest builder needs it; raw keys stay in memory only (hashed before writing)."""
    if not h.get("spacing"):
        problems = [*problems, "no PixelSpacing: 1 mm assumed"]
    return {"format": fmt, "modality": h["modality"], "body_part": h["body_part"], "spatial_dims": len(shape),
            "channels": 1, "shape": shape, "spacing": [float(s) for s in spacing], "affine": affine,
            "photometric": h["photometric"], "paths": paths, "problems": list(problems),
            "patient_key": h["patient_id"], "study_key": h["study_uid"], "series_key": h["series_uid"]}


def image_2d(h: dict, problems=()) -> dict:
    """A single-frame image with no third dimension: (X, Y) = (Columns, Rows)."""
    spacing = h.get("spacing") or [1.0, 1.0]
    return _record(h, "dicom-2d", [h["path"]], plane_affine(h), [h["cols"], h["rows"]],
                   [spacing[1], spacing[0]], list(problems))


def _distinct_positions(iop, ipps, order: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Frames in `order` minus those repeating the previous position (echoes, time points): first kept."""
    distance = np.asarray(ipps, dtype=float)[order] @ slice_normal(iop)
    keep = np.concatenate([[True], np.diff(distance) > 1e-3])
    if keep.all():
        return order, []
    return order[keep], [f"{int((~keep).sum())} frames repeat a position (multi-echo / dynamic?): first kept"]


def multiframe_geometry(h: dict) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(frame order, RAS affine, problems) of a multi-frame object; io.load_image uses the same answer.
    The order may hold fewer frames than the file when frames repeat a position."""
    n, spacing = h["frames"], h.get("spacing") or [1.0, 1.0]
    iop, ipps = h.get("iop"), h.get("frame_ipps")
    mixed = ["frames in several orientations: the first one is used"] if h.get("mixed_planes") else []
    if iop and ipps:
        order, problems = _distinct_positions(iop, ipps, order_positions(iop, ipps))
        ordered = np.asarray(ipps, dtype=float)[order]
        if len(order) > 1:
            step = (ordered[-1] - ordered[0]) / (len(order) - 1)
            problems += spacing_problems(iop, ordered)
            return order, stack_affine(iop, ordered[0], spacing, step), mixed + problems
    plane = iop or [1, 0, 0, 0, 1, 0]
    thickness = h.get("thickness") or 1.0
    origin = ipps[0] if ipps else (h.get("ipp") or [0, 0, 0])
    affine = stack_affine(plane, origin, spacing, slice_normal(plane) * thickness)
    return np.arange(n), affine, mixed + [f"no distinct per-frame positions: {n} frames stacked along k at "
                                          f"{thickness:g} mm"]


def multiframe_image(h: dict) -> dict:
    order, affine, problems = multiframe_geometry(h)
    spacing = h.get("spacing") or [1.0, 1.0]
    step = float(np.linalg.norm(affine[:3, 2]))
    return _record(h, "dicom-multiframe", [h["path"]], affine, [h["cols"], h["rows"], len(order)],
                   [spacing[1], spacing[0], step], problems)


def _drop_duplicate_sops(hs: list[dict]) -> tuple[list[dict], list[tuple[str, str]], list[str]]:
    kept, skipped, seen = [], [], {}
    for h in hs:
        first = seen.setdefault(h["sop_uid"], h["path"]) if h["sop_uid"] else h["path"]
        if first != h["path"]:
            skipped.append((h["path"], f"duplicate: same SOPInstanceUID as {first}"))
        else:
            kept.append(h)
    problems = [f"duplicate SOPInstanceUID: {len(skipped)} file(s) dropped, one copy kept"] if skipped else []
    return kept, skipped, problems


def _main_stack(hs: list[dict]) -> tuple[list[dict], list[tuple[str, str]], list[str]]:
    """The largest group of slices sharing orientation and matrix size; localizers and strays are set aside."""
    localizers = [h for h in hs if "LOCALIZER" in h["image_type"]]
    skipped = [(h["path"], "localizer: scout image (ImageType LOCALIZER)") for h in localizers]
    groups: dict = {}
    for h in hs:
        if "LOCALIZER" not in h["image_type"]:
            groups.setdefault((tuple(np.round(h["iop"], 3)), h["rows"], h["cols"]), []).append(h)
    if not groups:
        return [], skipped, []
    main = max(groups.values(), key=len)
    for group in groups.values():
        if group is not main:
            reason = ("localizer: lone slice whose orientation differs from its series" if len(group) == 1
                      else "mixed series: orientation or matrix size differs from the series' main stack")
            skipped += [(h["path"], reason) for h in group]
    problems = [f"dropped {len(skipped)} slice(s) not in the main stack (localizer / other orientation or size)"]
    return main, skipped, problems if skipped else []


def _drop_same_positions(stack: list[dict]) -> tuple[list[dict], list[tuple[str, str]], list[str]]:
    """Slices at one position twice (echoes, time points) cannot share a 3D grid: keep the first."""
    kept, skipped = [stack[0]], []
    normal = slice_normal(stack[0]["iop"])
    for h in stack[1:]:
        if abs((np.asarray(h["ipp"]) - kept[-1]["ipp"]) @ normal) < 1e-3:
            skipped.append((h["path"], f"duplicate position: same slice position as {kept[-1]['path']}"))
        else:
            kept.append(h)
    problems = [f"{len(skipped)} slice(s) repeat a position (multi-echo / dynamic?): first kept"] if skipped else []
    return kept, skipped, problems


def assemble_series(hs: list[dict]) -> tuple[list[dict], list[tuple[str, str]]]:
    """Images made from the single-frame files of one SeriesInstanceUID, and the files set aside."""
    hs = sorted(hs, key=lambda h: h["path"])
    if hs[0]["modality"] in PROJECTION or any(not (h["iop"] and h["ipp"]) for h in hs):
        return [image_2d(h) for h in hs], []
    hs, skipped, problems = _drop_duplicate_sops(hs)
    stack, more_skipped, more = _main_stack(hs)
    skipped, problems = skipped + more_skipped, problems + more
    if not stack:
        return [], skipped
    if len(stack) == 1:
        return [image_2d(stack[0], problems)], skipped
    stack = [stack[i] for i in order_positions(stack[0]["iop"], [h["ipp"] for h in stack])]
    stack, more_skipped, more = _drop_same_positions(stack)
    skipped, problems = skipped + more_skipped, problems + more
    if len(stack) == 1:
        return [image_2d(stack[0], problems)], skipped
    first = stack[0]
    ipps = np.asarray([h["ipp"] for h in stack], dtype=float)
    problems += spacing_problems(first["iop"], ipps)
    spacing = first["spacing"] or [1.0, 1.0]
    affine = stack_affine(first["iop"], ipps[0], spacing, (ipps[-1] - ipps[0]) / (len(stack) - 1))
    shape = [first["cols"], first["rows"], len(stack)]
    image = _record(first, "dicom-series", [h["path"] for h in stack], affine, shape,
                    [spacing[1], spacing[0], float(np.linalg.norm(affine[:3, 2]))], problems)
    return [image], skipped


def _too_large(image: dict, max_image_mb: float) -> str | None:
    """Each file passed its own size check; a series of many such files may still not fit once loaded."""
    loaded_mb = float(np.prod(image["shape"])) * image["channels"] * 4 / 2**20  # float32, as load_image returns
    if loaded_mb <= max_image_mb:
        return None
    return (f"too large: {image['format']} of {len(image['paths'])} file(s) loads as {loaded_mb:,.0f} MB float32 "
            f"> max_image_mb={max_image_mb:g}")


def assemble(headers: list[dict], max_image_mb: float = float("inf")) -> tuple[list[dict], list[tuple[str, str]]]:
    """All DICOM headers of a scan -> images (multi-frame files alone, single frames by series) + set-asides."""
    images, skipped, series = [], [], {}
    for h in headers:
        if h["frames"] > 1:
            images.append(multiframe_image(h))
        else:  # files without a SeriesInstanceUID cannot be grouped safely: each stands alone
            series.setdefault(h["series_uid"] or f"\0{h['path']}", []).append(h)
    for key in sorted(series):
        found, dropped = assemble_series(series[key])
        images += found
        skipped += dropped
    kept = []
    for image in images:
        reason = _too_large(image, max_image_mb)
        if reason:
            skipped += [(path, reason) for path in image["paths"]]
        else:
            kept.append(image)
    return kept, skipped
