"""The one way medssl writes (and reads back) CSV files: cells a spreadsheet would run as formulas are
neutralised.

A text cell (or column name) that starts with = + - @ TAB or CR is run as a formula by Excel / LibreOffice /
Sheets when a reviewer opens the file (OWASP "CSV injection"); file names and label names come from users'
folders, so such cells reach medssl's CSVs. Each one is written with a leading apostrophe, which
spreadsheets show as text. Numbers ("-1", "-0.5e-3") are left alone: they are not formulas. To keep the
round trip exact, a text cell that itself starts with an apostrophe gets one more; `restore` removes one.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def neutralise(value):
    """A cell as it is safe to write; anything but text passes through."""
    if not isinstance(value, str) or not value:
        return value
    if value.startswith("'") or (value.startswith(TRIGGERS) and not NUMBER.match(value)):
        return "'" + value
    return value


def restore(value):
    """The cell as it was before `neutralise`."""
    return value[1:] if isinstance(value, str) and value.startswith("'") else value


def safe_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy with every text cell and column name neutralised (numeric columns untouched)."""
    out = frame.rename(columns=lambda c: neutralise(str(c)))
    for column in out.columns:
        if not pd.api.types.is_numeric_dtype(out[column]) and not pd.api.types.is_bool_dtype(out[column]):
            out[column] = out[column].map(neutralise)
    return out


def csv_text(frame: pd.DataFrame, **kwargs) -> str:
    """The CSV text of `frame`, neutralised (kwargs go to DataFrame.to_csv)."""
    return safe_frame(frame).to_csv(index=False, lineterminator="\n", **kwargs)


def write_csv(frame: pd.DataFrame, path: Path, **kwargs) -> None:
    """Write `frame` to `path` as a neutralised CSV (kwargs go to DataFrame.to_csv, e.g. mode="a", header=False)."""
    safe_frame(frame).to_csv(path, index=False, **kwargs)


def read_csv(path: Path, **kwargs) -> pd.DataFrame:
    """Read a CSV medssl wrote, undoing the neutralisation (kwargs go to pandas.read_csv)."""
    frame = pd.read_csv(path, **kwargs)
    frame = frame.rename(columns=restore)
    for column in frame.columns:
        if frame[column].dtype == object or pd.api.types.is_string_dtype(frame[column]):
            frame[column] = frame[column].map(restore)
    return frame
