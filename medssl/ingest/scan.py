"""Find every DICOM / NIfTI file under a folder and read its header only, in parallel worker processes.

DICOM header reading lives here too (with the refusals that must happen before any pixel is decoded:
missing pixels, declared size over max_image_mb, truncation, missing codecs).

Nothing here raises for one bad file or directory: it becomes a skipped entry `(relative path, reason)`,
reasons shaped "category: detail" so the manifest summary can count them by category.
Files are recognised by content, not by name: DICOM by the 128-byte preamble + "DICM" (or, for
preamble-less files, a first tag in group 0002/0008 and a successful parse); NIfTI by .nii/.nii.gz plus
its header magic.
"""
from __future__ import annotations

import gzip
import os
import warnings
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from medssl.ingest.dicom.fields import basic_fields, enhanced_geometry, rescale_of
from medssl.ingest.dicom.known import identity
from medssl.ingest.dicom.parse import HEAD_BYTES, meta_group, parse, parse_buffer, pixel_layout
from medssl.ingest.decode import raster_header
from medssl.ingest.listing import list_files
from medssl.ingest.nifti_header import BOMB_RATIO, nifti_header
from medssl.ingest.redact import clean_reason
from medssl.ui import progress_bar

RASTER_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*")  # PNG, JPEG, TIFF (LE/BE)
CHUNK = 256          # files per worker task: big enough to amortise pickling, small enough for a live ETA
IN_PROCESS_BELOW = 64  # a pool costs more than it saves for a handful of files


@dataclass
class ScanResult:
    root: Path
    headers: list[dict] = field(default_factory=list)   # one per readable image file
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, "category: detail")
    n_files: int = 0


# objects that carry pixels but are not images to learn from
NOT_IMAGES = {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTIMAGE", "SR", "PR", "KO", "REG", "DOC", "PLAN"}
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
CODEC_PACKAGES = {  # transfer-syntax family -> what to pip install
    "JPEG 2000": "pylibjpeg pylibjpeg-openjpeg",
    "High-Throughput JPEG 2000": "pylibjpeg pylibjpeg-openjpeg",
    "JPEG-LS": "pylibjpeg pylibjpeg-libjpeg",
    "JPEG": "pylibjpeg pylibjpeg-libjpeg",
    "RLE": "pylibjpeg pylibjpeg-rle",
}
DEFLATED = "1.2.840.10008.1.2.1.99"
BOMB_EARLY_MB = 64  # a deflated dataset past this size at a bomb's ratio is refused without inflating the rest
NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}  # implicit LE, explicit LE / BE
PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


# ------------------------------------------------------------------------------------------ codecs
def _decoder_available(ts: UID) -> bool:
    return get_decoder(ts).is_available


def codec_problem(ts_uid: str) -> str | None:
    """None if pixels in this transfer syntax can be decoded here, else a reason naming what to install."""
    if ts_uid in NATIVE:  # asked once per file: skip the UID machinery for the common case
        return None
    ts = UID(ts_uid)
    if not ts.is_compressed:
        return None
    try:
        if _decoder_available(ts):
            return None
    except NotImplementedError:
        return f"unsupported codec: no pixel decoder exists for {ts.name or ts} ({ts})"
    package = next((p for fam, p in CODEC_PACKAGES.items() if (ts.name or "").startswith(fam)), "pylibjpeg")
    return (f"missing codec: {ts.name} ({ts}) needs a decoder: pip install {package} "
            f"(or pip install 'medssl[codecs]')")


# ------------------------------------------------------------------------------------------ headers
def _pixels_problem(h: dict, span: tuple | None, max_image_mb: float) -> str | None:
    """Refuse, before any pixel is read, what cannot or must not be decoded. `span` = (offset, length)
    of the pixel data element, None when there is none."""
    if span is None:
        return "no pixel data: the file has no PixelData element"
    if not h["rows"] or not h["cols"]:
        return "bad header: Rows/Columns missing or zero"
    declared_mb = h["rows"] * h["cols"] * h["frames"] * h["spp"] * max(h["bits"], 8) / 8 / 2**20
    if declared_mb > max_image_mb:
        return (f"too large: header declares {h['rows']}x{h['cols']}x{h['frames']} pixels = {declared_mb:,.0f} MB "
                f"> max_image_mb={max_image_mb:g} (raise max_image_mb if this image is genuine)")
    offset, length = span
    on_disk = h["ts"] != DEFLATED  # a deflated dataset's offsets count inflated bytes, not the file's
    if on_disk and length not in (None, 0xFFFFFFFF) and offset is not None and offset + length > h["size"]:
        return f"truncated: pixel data needs {length} bytes, the file ends {offset + length - h['size']} early"
    need = _native_bytes(h)
    if need is not None and length not in (None, 0xFFFFFFFF) and length < need:
        return (f"truncated: pixel data holds {length:,} bytes, {h['frames']} frame(s) of {h['rows']}x{h['cols']} "
                f"x {h['spp']} sample(s) at {h['bits']} bits need {need:,}")
    return codec_problem(h["ts"])


def _native_bytes(h: dict) -> int | None:
    """Bytes uncompressed pixel data must hold to fill every declared frame; None for encapsulated data."""
    if h["ts"] not in NATIVE and UID(h["ts"]).is_encapsulated:
        return None
    samples = 2 if h["photometric"] == "YBR_FULL_422" else h["spp"]  # 4:2:2 stores 2 samples per pixel
    return -(-h["rows"] * h["cols"] * h["frames"] * samples * h["bits"] // 8)


def _checked(src, path: str, ts: str | None, span: tuple | None, max_image_mb: float, force: bool) -> dict:
    """Header dict, or {"skip": reason} for what is not a usable image."""
    if src.get("SOPClassUID") is None and src.get("Rows") is None:  # parsed, but into nothing an image holds
        return {"skip": "not an image: neither DICOM nor NIfTI" if force else
                "unreadable: DICOM header holds neither SOPClassUID nor Rows (corrupt file?)"}
    modality = str(src.get("Modality") or "OT").upper()
    if modality in NOT_IMAGES:
        return {"skip": f"not an image: {modality} object"}
    h = basic_fields(src, path, modality, ts)
    reason = _pixels_problem(h, span, max_image_mb)
    return {"skip": reason} if reason else h


def _pydicom_header(path: str, max_image_mb: float, force: bool) -> dict:
    ds = pydicom.dcmread(path, defer_size="64 KB", force=force)  # large values are deferred, not read
    meta_class = str(getattr(ds.get("file_meta", {}), "get", lambda *_: "")("MediaStorageSOPClassUID", ""))
    if meta_class == DICOMDIR_CLASS or "DirectoryRecordSequence" in ds:
        return {"skip": "not an image: DICOMDIR (directory index)"}
    element = next((ds.get_item(tag) for tag in PIXEL_TAGS if tag in ds), None)
    span = None if element is None else (getattr(element, "value_tell", None), getattr(element, "length", None))
    h = _checked(ds, path, None, span, max_image_mb, force)
    if "skip" not in h and (h["frames"] > 1 or "PerFrameFunctionalGroupsSequence" in ds):
        enhanced_geometry(ds, h)
    return h


def dicom_header(path: str, max_image_mb: float, force: bool = False, head: bytes | None = None) -> dict:
    """Header fields medssl needs, without decoding pixels: the fast parser for ordinary uncompressed
    single-frame files, pydicom for everything else (multi-frame, compressed, big endian, odd layouts)."""
    fields = None if force else (parse_buffer(head) if head is not None else parse(path))
    if fields is not None and str(fields.get("NumberOfFrames") or "1") == "1":
        span = (fields["pixel_offset"], fields["pixel_length"])
        h = _checked(fields, path, fields["TransferSyntaxUID"], span, max_image_mb, force)
        layout = pixel_layout(fields) if "skip" not in h else None
        if layout is not None:   # what the cache needs to read its pixels without parsing it again (known.py)
            h["known"] = (identity(os.stat(path)), layout, rescale_of(fields))
        return h
    reason = None if force or head is None else inflate_problem(path, head, max_image_mb)
    return {"skip": reason} if reason else _pydicom_header(path, max_image_mb, force)


def inflate_problem(path: str, head: bytes, max_image_mb: float) -> str | None:
    """A Deflated-transfer-syntax file is inflated whole by pydicom: stream-inflate it first (CHUNK at a
    time, memory bounded) and refuse it if it inflates beyond max_image_mb or is corrupt."""
    try:
        syntax, start = meta_group(head)
    except Exception:  # noqa: BLE001 - not for this check to judge; pydicom reports it
        return None
    if syntax != DEFLATED:
        return None
    cap, seen, read, inflater = int(max_image_mb * 2**20), 0, 0, zlib.decompressobj(-zlib.MAX_WBITS)
    with open(path, "rb") as f:
        f.seek(start)
        while (chunk := f.read(2**20)) or inflater.unconsumed_tail:
            read += len(chunk)
            try:
                seen += len(inflater.decompress(inflater.unconsumed_tail + chunk, 2**22))
            except zlib.error:
                return "unreadable: the deflated dataset is corrupt"
            ratio = seen / max(read - len(inflater.unconsumed_tail), 1)
            if seen > cap or (seen > BOMB_EARLY_MB * 2**20 and ratio > BOMB_RATIO):
                return (f"decompression bound: the deflated dataset inflates beyond "
                        f"{'max_image_mb=' + format(max_image_mb, 'g') if seen > cap else f'{BOMB_RATIO}x its size'} "
                        f"({os.path.getsize(path):,} bytes on disk)")
            if inflater.eof:
                break
    return None


def _nifti_magic(path: str) -> bool:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(348)
    except (OSError, EOFError):
        return False
    return head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] == b"n+2\x00"


def sniff(path: str, head: bytes) -> str | None:
    """"dicom" | "dicom-nopreamble" | "nifti" | "raster" | "empty" | "bad-nifti" | None (not an image),
    from the name and the first bytes of the file."""
    if path.lower().endswith((".nii", ".nii.gz")):
        return "nifti" if _nifti_magic(path) else "bad-nifti"
    if not head:
        return "empty"
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(RASTER_MAGIC):
        return "raster"
    # a preamble-less file starts with a (group, element) tag; groups 0002/0008 begin every real one
    if len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00"):
        return "dicom-nopreamble"
    return None


def _header(path: str, max_image_mb: float) -> dict:
    with open(path, "rb") as f:
        head = f.read(HEAD_BYTES)  # one read serves sniffing and, for ordinary slices, the whole header
    kind = sniff(path, head)
    if kind is None:
        return {"skip": "not an image: neither DICOM nor NIfTI"}
    if kind == "empty":
        return {"skip": "empty file: 0 bytes"}
    if kind == "bad-nifti":
        return {"skip": "unreadable NIfTI: .nii name but no NIfTI header magic"}
    if kind == "nifti":
        return nifti_header(path, max_image_mb)
    if kind == "raster":
        return raster_header(path, max_image_mb)
    return dicom_header(path, max_image_mb, force=kind == "dicom-nopreamble", head=head)


def read_header(rel: str, root: str, max_image_mb: float) -> dict:
    """Header of one file as a plain dict (picklable), or {"path", "skip": reason}."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about every oddity; the skip reason says what matters
            header = _header(os.path.join(root, rel), max_image_mb)
    except Exception as err:  # one file must never stop the scan; the reason keeps the evidence
        message = str(err).splitlines()[0][:200] if str(err) else ""
        header = {"skip": f"unreadable: {type(err).__name__}: {clean_reason(message)}"}
    header["path"] = rel
    return header


def _read_chunk(rels: list[str], root: str, max_image_mb: float) -> list[dict]:
    return [read_header(rel, root, max_image_mb) for rel in rels]


def scan_folder(folder: Path, *, workers: int | None = None, max_image_mb: float = 4096,
                progress: bool = True, exclude: set[str] = frozenset()) -> ScanResult:
    """List `folder` recursively and read every file's header (no pixel data) in `workers` processes.

    `exclude` holds relative paths to ignore silently (e.g. the labels CSV kept next to the images).
    """
    folder = Path(folder)
    rels, skipped = list_files(folder)
    rels = [r for r in rels if r not in exclude]
    result = ScanResult(root=folder, skipped=skipped, n_files=len(rels))
    chunks = [rels[i:i + CHUNK] for i in range(0, len(rels), CHUNK)]
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(rels) < IN_PROCESS_BELOW:
        with progress_bar("files", enabled=progress) as bar:
            task = bar.add_task("index", total=len(rels))
            for chunk in chunks:
                _collect(result, _read_chunk(chunk, str(folder), max_image_mb))
                bar.advance(task, len(chunk))
    else:
        _scan_in_pool(result, chunks, workers, max_image_mb, progress)
    result.headers.sort(key=lambda h: h["path"])
    result.skipped.sort()
    return result


def _scan_in_pool(result: ScanResult, chunks: list[list[str]], workers: int, max_image_mb: float,
                  progress: bool) -> None:
    with ProcessPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
        # submitting first forks the workers before the progress bar starts its refresh thread
        futures = {pool.submit(_read_chunk, c, str(result.root), max_image_mb): c for c in chunks}
        with progress_bar("files", enabled=progress) as bar:
            task = bar.add_task("index", total=result.n_files)
            for future in as_completed(futures):
                _collect(result, _chunk_result(future, futures[future]))
                bar.advance(task, len(futures[future]))


def _chunk_result(future, chunk: list[str]) -> list[dict]:
    """A worker that died (e.g. killed for memory) loses its chunk, not the scan."""
    try:
        return future.result()
    except Exception as err:
        reason = f"worker failed: {type(err).__name__}: {clean_reason(str(err))}"
        return [{"path": rel, "skip": reason} for rel in chunk]


def _collect(result: ScanResult, headers: list[dict]) -> None:
    for header in headers:
        if "skip" in header:
            result.skipped.append((header["path"], header["skip"]))
        else:
            result.headers.append(header)

