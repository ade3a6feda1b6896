"""Read, validate and join a labels CSV.

A labels CSV has one id column and one or more label columns:
* id column: `patient_id` (the DICOM PatientID, or the manifest's pseudonymous "pat-..." id), `study_uid`,
  `series_uid` (raw UIDs or "stu-..." / "ser-..."), or `path` (a file or folder: relative to the scanned
  folder, relative to the labels file's own folder, or absolute; a folder labels every image under it, the
  most specific folder wins). join_on="auto" picks the one present (the most specific when several are).
* any further columns (e.g. a segmentation `mask`) ride along: the join is generic over columns.
* label columns: every other column. Integer codes (0, 1, 2, ...) or class names ("benign", "malignant"),
  which get codes in sorted order; an empty cell means unlabelled. Mixing numbers and names in one column,
  or non-integer numbers, is an error that names the file, column and row.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from medssl.errors import DataError
from medssl.ingest.masks import MASK_COLUMN, mask_table

ID_COLUMNS = ("path", "series_uid", "study_uid", "patient_id")  # most specific first: "auto" takes the first present
INTEGER = re.compile(r"^[+-]?\d+(\.0*)?$")


@dataclass
class LabelTable:
    source: Path
    id_column: str
    codes: pd.DataFrame                     # index: id (str), columns: label columns, Int64 codes
    names: dict[str, dict[int, str]]        # {column: {code: class name}}
    masks: pd.Series | None = None          # index: id, values: absolute mask paths ("" = none); ingest/masks.py


@dataclass
class JoinReport:
    n_labelled: int = 0
    n_unlabelled: int = 0
    unmatched: list[str] = field(default_factory=list)   # raw ids of label rows that matched no image: in
    unmatched_rows: list[int] = field(default_factory=list)  # memory only; shown as pseudonyms + file lines


def _where(source: Path, row: int | None = None, column: str | None = None) -> str:
    parts = [str(source)]
    if column is not None:
        parts.append(f"column '{column}'")
    if row is not None:
        parts.append(f"row {row + 2}")  # +1 for the header line, +1 because people count from 1
    return ", ".join(parts)


def _read_csv(source: Path) -> pd.DataFrame:
    if not source.is_file():
        raise DataError(f"labels file not found: {source}", where="data.labels / --labels",
                        fix="give the path of the labels CSV, or leave it out to build an unlabelled manifest")
    try:
        # utf-8-sig: spreadsheets often save a byte-order mark that would glue itself to the first column name
        frame = pd.read_csv(source, dtype=str, keep_default_na=False, skipinitialspace=True, encoding="utf-8-sig")
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise DataError(f"labels file cannot be read as CSV: {err}", where=str(source),
                        fix="save it as comma-separated UTF-8 text with a header line") from err
    names = [str(c).strip() for c in frame.columns]
    frame.columns = [n.lower() if n.lower() in ID_COLUMNS else n for n in names]  # "Patient_ID" is patient_id
    return frame.apply(lambda col: col.str.strip())


def _id_column(frame: pd.DataFrame, source: Path, join_on: str) -> str:
    if join_on != "auto":
        if join_on not in frame.columns:
            raise DataError(f"labels file has no '{join_on}' column (join_on={join_on})", where=str(source),
                            fix=f"add the column, or set join_on to one of the columns present: {list(frame.columns)}")
        return join_on
    present = [c for c in ID_COLUMNS if c in frame.columns]
    if not present:
        raise DataError("labels file has no id column", where=str(source),
                        fix=f"name one column {' / '.join(ID_COLUMNS)}; found columns {list(frame.columns)}")
    return present[0]


def _check_ids(ids: pd.Series, source: Path, column: str) -> None:
    empty = ids.index[ids == ""]
    if len(empty):
        raise DataError("empty id", where=_where(source, int(empty[0]), column), fix="fill the id or delete the row")
    dup = ids[ids.duplicated(keep=False)]
    if len(dup):
        rows = [int(i) + 2 for i in dup.index[:4]]
        # rows, not the value: ids are MRNs in real data, and errors reach consoles and logs
        raise DataError(f"duplicate id in labels: one id appears on rows {rows}",
                        where=_where(source, None, column), fix="keep one row per id (one label per id)")


def _codes(values: pd.Series, source: Path, column: str) -> tuple[pd.Series, dict[int, str]]:
    """One label column -> Int64 codes and {code: name}."""
    filled = values[values != ""]
    numeric = filled.str.match(INTEGER)
    if numeric.all():
        codes = pd.to_numeric(values.replace("", None)).astype("Int64")
        return codes, {int(c): str(int(c)) for c in sorted(codes.dropna().unique())}
    if numeric.any() or filled.str.match(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$").any():
        odd = filled[~numeric] if numeric.sum() >= len(filled) / 2 else filled[numeric]
        raise DataError(f"wrong type in label column: {odd.iloc[0]!r} among "
                        f"{'integer codes' if numeric.sum() >= len(filled) / 2 else 'class names'}",
                        where=_where(source, int(odd.index[0]), column),
                        fix="use integer class codes (0, 1, ...) or class names throughout one column")
    names = sorted(filled.unique())
    lookup = {name: code for code, name in enumerate(names)}
    return values.map(lambda v: lookup.get(v)).astype("Int64"), {c: n for n, c in lookup.items()}


def normalise_path(value: str) -> str:
    """Forward slashes, no trailing slash or leading "./"; an absolute path keeps its leading "/"."""
    return value.replace("\\", "/").rstrip("/").removeprefix("./")


def read_labels(source: Path, join_on: str = "auto") -> LabelTable:
    """Parse and validate a labels CSV; every problem is a DataError naming file, column and row."""
    source = Path(source)
    frame = _read_csv(source)
    column = _id_column(frame, source, join_on)
    _check_ids(frame[column], source, column)
    label_columns = [c for c in frame.columns if c not in ID_COLUMNS and c != MASK_COLUMN]
    if not label_columns and MASK_COLUMN not in frame.columns:
        raise DataError("labels file has an id column but no label column", where=str(source),
                        fix="add a column such as 'label' with class codes or names (or 'mask' with label-map paths)")
    ids = frame[column].map(normalise_path) if column == "path" else frame[column]
    codes, names = pd.DataFrame(index=pd.Index(ids, name=column)), {}
    for name in label_columns:
        values, names[name] = _codes(frame[name], source, name)
        codes[name] = values.to_numpy()
    masks = mask_table(frame, source).set_axis(codes.index) if MASK_COLUMN in frame.columns else None
    return LabelTable(source, column, codes, names, masks)


def path_keys(paths: list[str]) -> list[str]:
    """Every file and every parent folder of an image's files, most specific first."""
    keys = []
    for path in paths:
        parts = normalise_path(path).split("/")
        keys += ["/".join(parts[:n]) for n in range(len(parts), 0, -1)]
    return sorted(set(keys), key=lambda k: (-k.count("/"), k))


def path_aliases(ids, folder: Path, labels_file: Path) -> list[list[str]]:
    """What each label path may mean, as paths relative to the scanned `folder`: itself (relative to the
    folder), relative to the labels file's folder, or absolute. Aliases outside the folder are dropped."""
    folder, base = Path(folder).resolve(), Path(labels_file).resolve().parent
    out = []
    for value in ids:
        raw = Path(str(value).replace("\\", "/"))
        found = [] if raw.is_absolute() else [normalise_path(str(value))]
        for candidate in ([raw] if raw.is_absolute() else [base / raw]):
            resolved = Path(os.path.normpath(candidate))
            if resolved.is_relative_to(folder):
                found.append(normalise_path(resolved.relative_to(folder).as_posix()) or ".")
        out.append(list(dict.fromkeys(found)))
    return out


def join_labels(table: LabelTable, image_keys: list[list[str]],
                row_keys: list[list[str]] | None = None) -> tuple[pd.DataFrame, JoinReport]:
    """Labels for each image (rows in `image_keys` order); `image_keys[n]` lists the ids image n answers
    to, most specific first; `row_keys[r]` the ids label row r answers to (default: its id). Unlabelled
    images get <NA>; every column of the table is joined, whatever it holds."""
    row_keys = row_keys if row_keys is not None else [[key] for key in table.codes.index]
    index = {}
    for pos, keys in enumerate(row_keys):
        for key in keys:
            index.setdefault(key, pos)
    matched_rows, picks = set(), []
    for keys in image_keys:
        pos = next((index[k] for k in keys if k in index), None)
        picks.append(pos)
        if pos is not None:
            matched_rows.add(pos)
    out = pd.DataFrame({c: pd.array([table.codes[c].iloc[p] if p is not None else pd.NA for p in picks],
                                    dtype="Int64" if c in table.names else object)  # label codes / other
                        for c in table.codes.columns})
    labelled = int(out.notna().any(axis=1).sum()) if len(out.columns) else 0
    missed = [pos for pos in range(len(table.codes.index)) if pos not in matched_rows]
    return out, JoinReport(labelled, len(image_keys) - labelled, [str(table.codes.index[p]) for p in missed],
                           [p + 2 for p in missed])  # +2: the header line, and people count from 1
