"""A small, fast reader for the DICOM attributes medssl needs, in uncompressed little-endian files.

Why: pydicom builds a full Dataset and converts each value on access; indexing a folder of many thousand
slices pays that on every file, for only the few tags medssl needs. This reader walks the element stream
with `struct`, keeps ~25 tags, skips everything else by its length (sequences included) and stops at
PixelData, whose offset it records so a slice is decoded from one read of its file. It returns None for
anything outside its lane (big endian, compressed, DICOMDIR, Enhanced multi-frame, odd layouts); callers
then use pydicom, so correctness never depends on this shortcut.

`fields.py` turns either source (these fields or a pydicom Dataset) into the one header dict medssl uses.
"""
from __future__ import annotations

import functools
import struct

import numpy as np
from pydicom.charset import convert_encodings
from pydicom.values import convert_text

IMPLICIT_LE, EXPLICIT_LE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
LONG_VRS = {b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"OD", b"OL", b"OV", b"UC", b"UR", b"SV", b"UV"}
UNDEFINED = 0xFFFFFFFF
PIXEL_DATA = 0x7FE00010
MODALITY_LUT_SEQUENCE = 0x00283000  # a LUT instead of (or besides) rescale: decoded by pydicom's apply_modality_lut
# (group << 16 | element) -> (key, kind): kind "s" = default-repertoire string (multi-valued by "\"),
# "t" = text whose bytes follow SpecificCharacterSet (decoded by pydicom's own convert_text, so this reader
# and pydicom give one PatientID for one patient), "u" = uint16
WANTED = {
    0x00080005: ("SpecificCharacterSet", "s"),
    0x00080008: ("ImageType", "s"), 0x00080016: ("SOPClassUID", "s"), 0x00080018: ("SOPInstanceUID", "s"),
    0x00080060: ("Modality", "s"), 0x00100020: ("PatientID", "t"), 0x00180015: ("BodyPartExamined", "s"),
    0x00180050: ("SliceThickness", "s"), 0x00180088: ("SpacingBetweenSlices", "s"),
    0x0020000D: ("StudyInstanceUID", "s"), 0x0020000E: ("SeriesInstanceUID", "s"),
    0x00200032: ("ImagePositionPatient", "s"), 0x00200037: ("ImageOrientationPatient", "s"),
    0x00280002: ("SamplesPerPixel", "u"), 0x00280004: ("PhotometricInterpretation", "s"),
    0x00280008: ("NumberOfFrames", "s"), 0x00280010: ("Rows", "u"), 0x00280011: ("Columns", "u"),
    0x00280030: ("PixelSpacing", "s"), 0x00181164: ("ImagerPixelSpacing", "s"),
    0x00280100: ("BitsAllocated", "u"), 0x00280101: ("BitsStored", "u"), 0x00280103: ("PixelRepresentation", "u"),
    0x00281052: ("RescaleIntercept", "s"), 0x00281053: ("RescaleSlope", "s"),
}
HEAD_BYTES = 64 * 1024
_TAG_VR_SHORT = struct.Struct("<HH2sH")   # explicit VR: group, element, VR, 16-bit length
_TAG_LONG = struct.Struct("<HHI")         # implicit VR, items and delimiters: group, element, 32-bit length
_U32 = struct.Struct("<I")  # headers of ordinary slices end well before this; longer ones fall back to pydicom


class _Outside(Exception):
    """The file leaves this reader's lane: use pydicom."""


def meta_group(buf: bytes) -> tuple[str | None, int]:
    """(transfer syntax, offset where the dataset starts) from the explicit-VR group 0002 after the preamble."""
    if buf[128:132] != b"DICM":
        raise _Outside
    pos, syntax = 132, None
    while pos + 8 <= len(buf):
        group, element = struct.unpack_from("<HH", buf, pos)
        if group != 2:
            break
        vr = buf[pos + 4:pos + 6]
        if vr in LONG_VRS:
            length, start = struct.unpack_from("<I", buf, pos + 8)[0], pos + 12
        else:
            length, start = struct.unpack_from("<H", buf, pos + 6)[0], pos + 8
        if element == 0x0010:
            syntax = buf[start:start + length].rstrip(b"\0 ").decode("ascii")
        pos = start + length
    return syntax, pos


def _meta(buf: bytes) -> tuple[str, int]:
    """Transfer syntax and dataset offset, for the little-endian syntaxes this reader handles."""
    syntax, pos = meta_group(buf)
    if syntax not in (IMPLICIT_LE, EXPLICIT_LE):
        raise _Outside
    return syntax, pos


def _element(buf: bytes, pos: int, explicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, VR or None, value length, value start) of the element at `pos`."""
    if pos + 8 > len(buf):
        raise _Outside
    if explicit:
        group, element, vr, length = _TAG_VR_SHORT.unpack_from(buf, pos)
        if group != 0xFFFE:  # items and delimiters never carry a VR
            if vr in LONG_VRS:
                return group << 16 | element, vr, _U32.unpack_from(buf, pos + 8)[0], pos + 12
            return group << 16 | element, vr, length, pos + 8
    group, element, length = _TAG_LONG.unpack_from(buf, pos)
    return group << 16 | element, None, length, pos + 8


def _skip_undefined(buf: bytes, pos: int, explicit: bool) -> int:
    """Position after an undefined-length sequence or item that starts at `pos` (its value)."""
    while True:
        tag, vr, length, start = _element(buf, pos, explicit)
        if tag in (0xFFFEE0DD, 0xFFFEE00D):  # sequence / item delimitation
            return start
        if length == UNDEFINED:
            if vr == b"UN":  # its content is implicit VR: not worth the special case
                raise _Outside
            pos = _skip_undefined(buf, start, explicit)
        else:
            pos = start + length


def _value(raw: bytes, kind: str):
    if kind == "u":
        return struct.unpack_from("<H", raw)[0] if len(raw) >= 2 else None
    if kind == "t":
        return raw  # decoded once the character set is known (see _decode_text)
    text = raw.rstrip(b"\0 ").decode("ascii").strip()  # non-ASCII here: outside the lane (UnicodeDecodeError)
    return text.split("\\") if "\\" in text else text


def _decode_text(out: dict) -> None:
    """Decode the "t" values with the file's SpecificCharacterSet, exactly as pydicom does."""
    charset = out.get("SpecificCharacterSet")
    encodings = _encodings(tuple(charset) if isinstance(charset, list) else charset or None)
    for key, kind in WANTED.values():
        if kind == "t" and isinstance(out.get(key), bytes):
            value = convert_text(out[key], list(encodings))
            out[key] = value if isinstance(value, str) else list(value)


@functools.lru_cache(maxsize=64)
def _encodings(charset: str | tuple | None) -> tuple:
    """pydicom's Python codecs for a SpecificCharacterSet value, looked up once per value (every slice of a
    series carries the same one, and the lookup cost as much as the rest of the text decoding)."""
    return tuple(convert_encodings(list(charset) if isinstance(charset, tuple) else charset))


def parse_buffer(buf: bytes) -> dict | None:
    """{keyword: value} of the WANTED tags plus pixel offset/length and transfer syntax, or None."""
    try:
        syntax, pos = _meta(buf)
        explicit, out = syntax == EXPLICIT_LE, {"TransferSyntaxUID": syntax}
        while True:
            tag, vr, length, start = _element(buf, pos, explicit)
            if tag == PIXEL_DATA:
                if length == UNDEFINED:
                    raise _Outside
                out["pixel_offset"], out["pixel_length"] = start, length
                _decode_text(out)
                return out
            if tag >> 16 in (0x0004, 0x5200) or (tag >> 16) > 0x7FE0:  # DICOMDIR / functional groups / no pixels
                raise _Outside
            if tag == MODALITY_LUT_SEQUENCE:
                out["modality_lut"] = True
            if tag in WANTED:
                if start + length > len(buf):
                    raise _Outside
                key, kind = WANTED[tag]
                out[key] = _value(buf[start:start + length], kind)
            if length == UNDEFINED and vr == b"UN":
                raise _Outside
            pos = _skip_undefined(buf, start, explicit) if length == UNDEFINED else start + length
    except (_Outside, struct.error, UnicodeError, LookupError, ValueError, RecursionError):
        return None  # odd or unknown character sets included: pydicom decides (and warns) instead


def parse(path: str) -> dict | None:
    """Header fields from the first HEAD_BYTES of a file (the scan never reads pixel bytes)."""
    try:
        with open(path, "rb") as f:
            return parse_buffer(f.read(HEAD_BYTES))
    except OSError:
        return None


def read_slice(path: str) -> tuple[np.ndarray, dict] | None:
    """(pixels (Rows, Columns) as stored, fields) with one read of the whole file, or None (use pydicom)."""
    try:
        with open(path, "rb") as f:
            buf = f.read()
    except OSError:
        return None
    fields = parse_buffer(buf)
    pixels = _pixels(buf, fields) if fields is not None else None
    return None if pixels is None else (pixels, fields)


def pixel_layout(fields: dict) -> tuple[str, int, int, int] | None:
    """(dtype, rows, columns, offset) of pixels this reader decodes itself, or None when the layout needs
    pydicom's care (colour, several frames, BitsStored < BitsAllocated, unusual bit depths, short pixel data,
    a modality LUT)."""
    bits, stored = fields.get("BitsAllocated"), fields.get("BitsStored")
    if fields.get("modality_lut") or fields.get("SamplesPerPixel", 1) != 1 \
            or str(fields.get("NumberOfFrames") or "1") != "1" \
            or bits not in (8, 16, 32) or stored != bits:
        return None
    dtype = np.dtype(f"<{'i' if fields.get('PixelRepresentation') == 1 else 'u'}{bits // 8}")
    rows, cols = fields.get("Rows") or 0, fields.get("Columns") or 0
    if rows * cols == 0 or rows * cols * dtype.itemsize > fields["pixel_length"]:
        return None
    return dtype.str, rows, cols, fields["pixel_offset"]


def pixels_at(buf: bytes, layout: tuple[str, int, int, int]) -> np.ndarray | None:
    """(Rows, Columns) raw stored values of `buf` laid out as `layout`, or None if the file is too short."""
    dtype, rows, cols, offset = layout
    if offset + rows * cols * np.dtype(dtype).itemsize > len(buf):
        return None
    return np.frombuffer(buf, dtype=dtype, count=rows * cols, offset=offset).reshape(rows, cols)


def _pixels(buf: bytes, fields: dict) -> np.ndarray | None:
    layout = pixel_layout(fields)
    return None if layout is None else pixels_at(buf, layout)
