"""List every regular file under a folder, and report every other path that was seen and not used.

Nothing here raises for one bad entry: it becomes a skipped entry `(relative path, "category: detail")`.
What is reported rather than listed: dangling links, FIFOs / sockets / devices (never opened: a FIFO would
block the scan), folders named like image files (`x.dcm/`; their contents are still listed), names that
are not valid UTF-8 (the manifest is UTF-8 text; the name is shown with its odd bytes escaped), names with
'|' (it separates paths in the manifest) and unreadable directories.
"""
from __future__ import annotations

import os
import stat

IMAGE_SUFFIXES = (".dcm", ".dicom", ".ima", ".nii", ".nii.gz", ".png", ".jpg", ".jpeg", ".tif", ".tiff")
SPECIAL = {stat.S_IFIFO: "FIFO (named pipe)", stat.S_IFSOCK: "socket", stat.S_IFCHR: "character device",
           stat.S_IFBLK: "block device"}


def printable(rel: str) -> str:
    """A name fit for UTF-8 files and consoles: bytes that are not UTF-8 (kept by Python as surrogate
    escapes) shown as \\xNN."""
    return os.fsencode(rel).decode("utf-8", "backslashreplace")


def _list_dir(path: str) -> list[os.DirEntry]:
    """One directory's entries; a seam so tests can simulate unreadable directories when running as root."""
    with os.scandir(path) as it:
        return list(it)


def _name_problem(rel: str) -> str | None:
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return "unsupported name: not valid UTF-8 (rename the file or folder to UTF-8 to index it)"
    if "|" in rel:
        return "unsupported name: '|' in the path (it separates paths in the manifest)"
    return None


def _other(entry: os.DirEntry) -> str:
    """Why a path that is neither a folder nor a regular file is not used."""
    if entry.is_symlink() and not os.path.exists(entry.path):
        return f"broken link: points to a missing target ({printable(os.readlink(entry.path))})"
    mode = entry.stat(follow_symlinks=True).st_mode
    kind = SPECIAL.get(stat.S_IFMT(mode), f"file type {stat.S_IFMT(mode):o}")
    return f"not a regular file: {kind}"


def _entry(entry: os.DirEntry, rel: str, seen: set, stack: list, files: list, skipped: list) -> None:
    problem = _name_problem(rel)
    if entry.is_dir():  # symlinked folders are followed (datasets are often linked in), each real one once
        if problem:
            skipped.append((printable(rel), problem + "; nothing under it is indexed"))
            return
        if entry.name.lower().endswith(IMAGE_SUFFIXES):
            skipped.append((rel, "not a file: a folder named like an image file (what it holds is listed on "
                                 "its own)"))
        real = os.path.realpath(entry.path)
        if real not in seen:
            seen.add(real)
            stack.append(entry.path)
    elif entry.is_file():
        if problem:
            skipped.append((printable(rel), problem))
        else:
            files.append(rel)
    else:
        skipped.append((printable(rel), problem or _other(entry)))


def list_files(folder) -> tuple[list[str], list[tuple[str, str]]]:
    """Relative paths of all regular files under `folder` (sorted), and what was seen but not listed."""
    root = str(folder)
    prefix = root.rstrip(os.sep) + os.sep   # every entry path is built by joining onto root: slicing is
    files, skipped, stack, seen = [], [], [root], {os.path.realpath(root)}   # relpath at a tenth of its cost
    while stack:
        current = stack.pop()
        try:
            entries = _list_dir(current)
        except OSError as err:
            skipped.append((printable(os.path.relpath(current, root)),
                            f"unreadable directory: {err.strerror or type(err).__name__}"))
            continue
        for entry in entries:
            rel = entry.path[len(prefix):] if entry.path.startswith(prefix) else os.path.relpath(entry.path, root)
            try:
                _entry(entry, rel, seen, stack, files, skipped)
            except OSError as err:
                skipped.append((printable(rel), f"unreadable: {err.strerror or type(err).__name__}"))
    return sorted(files), skipped
