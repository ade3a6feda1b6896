"""DICOM geometry and series assembly (header fields come from medssl.data.dicom_parse).

Geometry conventions (the inverse of medssl.data.dicom_writer): DICOM positions are LPS+; an image's
row cosine (IOP[:3]) is the direction in which the column index i grows, the column cosine (IOP[3:]) the
direction in which the row index j grows; PixelSpacing is [between rows (j), between columns (i)].
Slices are ordered by the projection of ImagePositionPatient on the slice normal (row x column cosine),
never by InstanceNumber or file name. Affines returned here map (i, j, k) to RAS+ (NIfTI convention).
"""
from __future__ import annotations

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


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


def _positions(iop, ipps_sorted) -> np.ndarray:
    return np.asarray(ipps_sorted, dtype=float) @ slice_normal(iop)


def contiguous_blocks(iop, ipps_sorted) -> list[np.ndarray]:
    """Indices of the runs of slices with no missing slice between them.

    Decision (stated in `problems` too): a series with missing slices is SPLIT at each gap (a step over 1.5x
    the usual one) into contiguous blocks, each its own image whose affine holds its slices at their true
    positions. Resampling would invent the missing anatomy; one uniform grid would misplace every slice after
    the gap."""
    gaps = np.diff(_positions(iop, ipps_sorted))
    if len(gaps) < 2:
        return [np.arange(len(gaps) + 1)]
    cuts = np.flatnonzero(gaps > 1.5 * float(np.median(gaps))) + 1
    return np.split(np.arange(len(gaps) + 1), cuts)


def spacing_problems(iop, ipps_sorted) -> list[str]:
    """Uneven spacing within one contiguous block, with the worst slice's distance from the uniform grid the
    affine assumes (first to last slice over n-1 steps)."""
    distance = _positions(iop, ipps_sorted)
    gaps = np.diff(distance)
    if len(gaps) < 2 or gaps.max() - gaps.min() <= max(0.01, 0.01 * float(np.median(gaps))):
        return []
    grid = np.linspace(distance[0], distance[-1], len(distance))
    return [f"uneven slice spacing: {gaps.min():.3g}..{gaps.max():.3g} mm (a slice lies up to "
            f"{np.abs(distance - grid).max():.3g} mm from the uniform grid)"]


def gap_problem(blocks: list[np.ndarray], index: int, what: str = "slices") -> str:
    """The note each block of a split series carries."""
    block = blocks[index]
    return (f"missing slices: the series has gaps, so it was split into {len(blocks)} contiguous blocks; this is "
            f"block {index + 1} ({what} {block[0]}..{block[-1]} of the sorted series)")


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
        blocks = contiguous_blocks(iop, np.asarray(ipps, dtype=float)[order])
        if len(blocks) > 1:  # one file is one image: keep its largest contiguous block of frames
            largest = max(range(len(blocks)), key=lambda b: len(blocks[b]))
            problems.append(gap_problem(blocks, largest, "frames") + f"; the other {len(order) - len(blocks[largest])}"
                            f" frame(s) are not used")
            order = order[blocks[largest]]
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
    problems = _twins_problem([h]) + problems
    spacing = h.get("spacing") or [1.0, 1.0]
    step = float(np.linalg.norm(affine[:3, 2]))
    return _record(h, "dicom-multiframe", [h["path"]], affine, [h["cols"], h["rows"], len(order)],
                   [spacing[1], spacing[0], step], problems)


def drop_duplicate_sops(hs: list[dict], decodable=None) -> tuple[list[dict], list[tuple[str, str]]]:
    """One file per SOPInstanceUID. Among copies (sorted by path) the first that `decodable(header)` accepts
    is kept (the first copy when none does or no check is given); each kept copy counts its dropped twins."""
    groups: dict = {}
    for h in sorted(hs, key=lambda h: h["path"]):
        groups.setdefault(h["sop_uid"] or "\0" + h["path"], []).append(h)
    kept, skipped = [], []
    for copies in groups.values():
        ok = {id(h): bool(decodable(h)) for h in copies} if decodable and len(copies) > 1 else {}
        keep = next((h for h in copies if ok.get(id(h))), copies[0])
        keep["twins"] = len(copies) - 1
        kept.append(keep)
        skipped += [(h["path"], f"duplicate: same SOPInstanceUID as {keep['path']}"
                     + ("" if ok.get(id(h), True) else " (this copy's pixels do not decode)"))
                    for h in copies if h is not keep]
    return kept, skipped


def _twins_problem(hs: list[dict]) -> list[str]:
    dropped = sum(h.get("twins", 0) for h in hs)
    return [f"duplicate SOPInstanceUID: {dropped} file(s) dropped, one copy kept"] if dropped else []


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
    skipped, problems = [], _twins_problem(hs)
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
    blocks = contiguous_blocks(stack[0]["iop"], [h["ipp"] for h in stack])
    images = []
    for b, block in enumerate(blocks):
        part = [stack[i] for i in block]
        notes = problems + ([gap_problem(blocks, b)] if len(blocks) > 1 else [])
        if len(part) == 1:  # one slice between two gaps has no 3D neighbours to share a grid with
            skipped.append((part[0]["path"], "missing slices: lone slice between two gaps of its series"))
        else:
            images.append(_stack_image(part, notes))
    return images, skipped


def _stack_image(stack: list[dict], problems: list[str]) -> dict:
    """One contiguous block of sorted slices; the affine runs from the first slice's IPP to the last one's."""
    first = stack[0]
    ipps = np.asarray([h["ipp"] for h in stack], dtype=float)
    problems = problems + spacing_problems(first["iop"], ipps)
    spacing = first["spacing"] or [1.0, 1.0]
    affine = stack_affine(first["iop"], ipps[0], spacing, (ipps[-1] - ipps[0]) / (len(stack) - 1))
    shape = [first["cols"], first["rows"], len(stack)]
    return _record(first, "dicom-series", [h["path"] for h in stack], affine, shape,
                   [spacing[1], spacing[0], float(np.linalg.norm(affine[:3, 2]))], problems)


def _too_large(image: dict, max_image_mb: float) -> str | None:
    """Each file passed its own size check; a series of many such files may still not fit once loaded."""
    loaded_mb = float(np.prod(image["shape"])) * image["channels"] * 4 / 2**20  # float32, as load_image returns
    if loaded_mb <= max_image_mb:
        return None
    return (f"too large: {image['format']} of {len(image['paths'])} file(s) loads as {loaded_mb:,.0f} MB float32 "
            f"> max_image_mb={max_image_mb:g}")


def assemble(headers: list[dict], max_image_mb: float = float("inf"),
             decodable=None) -> tuple[list[dict], list[tuple[str, str]]]:
    """All DICOM headers of a scan -> images (multi-frame files alone, single frames by series) + set-asides.
    `decodable(header) -> bool` chooses among copies of one SOPInstanceUID (asked only where there are copies)."""
    headers, skipped = drop_duplicate_sops(headers, decodable)
    images, series = [], {}
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
