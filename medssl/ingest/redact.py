"""Identifier-free text for what leaves the machine (MLflow, consoles, shared reports).

* `display_path`: a relative path with its date-like parts (20200619, 2020-06-19, 19.06.2020) and id-like
  parts (any name token holding 4+ digits: MRN0000123, 1234567, IM00012) replaced by a salted digest
  ("#3fa9c1e2"). The same part always gets the same digest under one salt, so folder structure and
  grouping stay readable (`sub-01/ses-#3fa9c1e2/anat/T1w.nii.gz`) while the value does not. The manifest
  keeps the real relative path in its local CSV (the loader needs it); the shared copies carry this form.
* `clean_reason`: a skip reason with quoted values (b'MRN0000123', 'Smith^John') and id-like runs removed:
  reasons built from exception messages would otherwise quote header bytes.
"""
from __future__ import annotations

import functools
import hashlib
import re

DATE = r"(?<![0-9])(?:(?:19|20)\d{2}[-_.]?[01]\d[-_.]?[0-3]\d|[0-3]\d[-_.][01]\d[-_.](?:19|20)\d{2})(?![0-9])"
PART = re.compile(rf"(?P<date>{DATE})|[A-Za-z0-9]+")  # a date (separators included) first, else a name token
QUOTED = re.compile(r"""b?'[^']*'|b?"[^"]*\"""")
DIGITS = re.compile(r"[A-Za-z]*\d{4,}[A-Za-z0-9]*")


def _digest(value: str, salt: str) -> str:
    return "#" + hashlib.sha256(f"{salt}\x00path-part\x00{value}".encode("utf-8", "surrogateescape")).hexdigest()[:8]


def _id_like(token: str) -> bool:
    return sum(map(str.isdigit, token)) >= 4


def display_path(path: str, salt: str) -> str:
    """`path` with date-like and id-like parts replaced by salted digests (separators and other parts kept)."""
    folder, sep, name = path.rpartition("/")
    return _shown_part(folder, salt) + sep + _shown_part(name, salt)


@functools.lru_cache(maxsize=4096)
def _shown_part(text: str, salt: str) -> str:
    """(cached: the slices of a series share their folder, and the folder's redaction was most of the cost)"""
    def replace(m: re.Match) -> str:
        return _digest(m.group(0), salt) if m.group("date") or _id_like(m.group(0)) else m.group(0)
    return PART.sub(replace, text)


def clean_reason(reason: str) -> str:
    """A skip reason fit for shared reports: quoted values and id-like runs become '…'."""
    return DIGITS.sub("…", QUOTED.sub("'…'", reason))
