"""Folder of DICOM / NIfTI (+ labels CSV) -> manifest CSV, skipped report and metadata.
Schema: data_manifests/README.md.

Pseudonymisation happens here: patient / study / series ids and image ids are salted SHA-256 digests; patient
names, birth dates and raw ids never reach the files written. Relative paths are kept (the loader needs
them), so folder and file names must not themselves carry identifying information.
"""
from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import nibabel as nib
import pandas as pd

from medssl.ingest.decode import decodable
from medssl.ingest.dicom.assemble import assemble
from medssl.ingest.dicom.known import remember
from medssl.ingest.labels import JoinReport, join_labels, path_aliases, path_keys, read_labels
from medssl.ingest.manifest_io import (COLUMNS, read_manifest, shared_paths, sidecar,  # noqa: F401 (re-exported)
                                      write_build, write_manifest)
from medssl.ingest.masks import attach_masks, join_masks, mask_files
from medssl.ingest.redact import display_path
from medssl.ingest.scan import scan_folder
from medssl.errors import DataError

PREFIX = {"patient_id": "pat-", "study_uid": "stu-", "series_uid": "ser-"}
KEY_OF = {"patient_id": "patient_key", "study_uid": "study_key", "series_uid": "series_key"}  # id column -> image key


@dataclass
class ManifestSummary:
    out_csv: Path
    n_files: int
    n_images: int
    skipped_by_reason: dict[str, int]
    n_with_problems: int
    label_columns: list[str] = field(default_factory=list)
    n_labelled: int = 0
    n_unlabelled: int = 0
    unmatched_labels: list[str] = field(default_factory=list)  # shown forms: pseudonyms / redacted paths + line

    def render(self) -> str:
        lines = [f"manifest {self.out_csv}: {self.n_images} images from {self.n_files} files",
                 f"  kept with problems: {self.n_with_problems} (see the 'problems' column)"]
        if self.n_images == 0:
            lines.append("  no usable image found: check the folder and the skipped report below")
        skipped = sum(self.skipped_by_reason.values())
        where = f" (see {self.out_csv.with_suffix('.skipped.csv')})" if skipped else ""
        lines.append(f"  skipped: {skipped}{where}")
        lines += [f"    {count:>6}  {reason}" for reason, count in sorted(self.skipped_by_reason.items())]
        if self.label_columns:
            lines.append(f"  labels {self.label_columns}: {self.n_labelled} labelled, {self.n_unlabelled} unlabelled, "
                         f"{len(self.unmatched_labels)} label rows matched no image")
            if self.unmatched_labels:
                lines.append(f"    unmatched (pseudonymised, first 5): {', '.join(self.unmatched_labels[:5])}")
        return "\n".join(lines)


def pseudonym(prefix: str, value: str, salt: str) -> str:
    """Salted SHA-256, 12 hex digits: stable for one salt, unlinkable to the raw value without it."""
    return prefix + hashlib.sha256(f"{salt}\x00{value}".encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------ images
def _file_stem(name: str) -> str:
    return name.removesuffix(".gz").rsplit(".", 1)[0]


def _patient_key(path: str) -> str:
    """NIfTI / PNG carry no patient, so the layout names one: a BIDS "sub-XX" folder, else the first folder
    under the scanned root (`root/<patient>/...`, the usual export layout), else the file itself."""
    parts = path.replace("\\", "/").split("/")
    subject = next((p for p in parts[:-1] if p.startswith("sub-")), None)
    return subject or (parts[0] if len(parts) > 1 else _file_stem(parts[-1]))


def _file_patients(records: list[dict]) -> None:
    """Guard on the folder rule: if it puts every file of a format in ONE patient (e.g. root/images/*.nii),
    the folder is a container, not a patient; then each file is its own patient, flagged."""
    by_folder = [r for r in records if "/" in r["paths"][0] and not r["patient_key"].startswith("sub-")]
    if len(by_folder) > 1 and len({r["patient_key"] for r in by_folder}) == 1:
        for record in by_folder:
            record["patient_key"] = _file_stem(record["paths"][0].split("/")[-1]) + "@" + record["paths"][0]
            record["problems"].append("patient unknown: each file treated as its own patient")


def _study_key(path: str) -> str:
    """A BIDS "ses-XX" folder groups a patient's images into one study; else each file is its own study."""
    parts = path.replace("\\", "/").split("/")
    session = next((i for i, p in enumerate(parts[:-1]) if p.startswith("ses-")), None)
    return "/".join(parts[:session + 1]) if session is not None else path


def _file_record(h: dict, modality: str) -> dict:
    """NIfTI and PNG / JPEG / TIFF: one file, one image, no identifiers inside."""
    return {"format": "nifti" if h["kind"] == "nifti" else "image-2d", "modality": modality, "body_part": "",
            "spatial_dims": h["spatial_dims"], "channels": h["channels"], "shape": h["shape"],
            "spacing": h["spacing"], "affine": h["affine"], "photometric": h.get("photometric", "MONOCHROME2"),
            "paths": [h["path"]], "problems": list(h["problems"]), "patient_key": _patient_key(h["path"]),
            "study_key": _study_key(h["path"]), "series_key": h["path"]}


def _fill_missing_keys(image: dict) -> None:
    """Images without PatientID fall back to their study (else their first file), flagged."""
    if not image["patient_key"]:
        image["patient_key"] = "study:" + image["study_key"] if image["study_key"] else "path:" + image["paths"][0]
        image["problems"].append("no PatientID: the study stands in for the patient")
    image["study_key"] = image["study_key"] or "path:" + image["paths"][0]
    image["series_key"] = image["series_key"] or "path:" + image["paths"][0]


def _row(image: dict, salt: str) -> dict:
    _fill_missing_keys(image)
    return {
        "image_id": pseudonym("img-", "|".join(image["paths"]), salt),
        "patient_id": pseudonym("pat-", image["patient_key"], salt),
        "study_id": pseudonym("stu-", image["study_key"], salt),
        "series_id": pseudonym("ser-", image["series_key"], salt),
        "format": image["format"], "modality": image["modality"], "body_part": image["body_part"],
        "spatial_dims": image["spatial_dims"], "channels": image["channels"],
        "shape": "x".join(str(int(s)) for s in image["shape"]),
        "spacing": "x".join(f"{s:.4g}" for s in image["spacing"]),
        "orientation": "".join(nib.aff2axcodes(image["affine"])[:3]),
        "photometric": image["photometric"], "n_files": len(image["paths"]), "paths": "|".join(image["paths"]),
        "split": "", "problems": "; ".join(image["problems"]),
    }


def _image_keys(images: list[dict], id_column: str, salt: str) -> list[list[str]]:
    """What each image answers to in the labels' id column: raw value and its pseudonym (or its paths)."""
    if id_column == "path":
        return [path_keys(image["paths"]) for image in images]
    key = KEY_OF[id_column]
    return [[image[key], pseudonym(PREFIX[id_column], image[key], salt)] for image in images]


# ------------------------------------------------------------------------------------------ build
def _excluded(folder: Path, *paths: Path | None) -> set[str]:
    """Relative paths of the labels file and manifest outputs when they sit inside the scanned folder."""
    out = set()
    for path in filter(None, paths):
        resolved = Path(path).resolve()
        if resolved.is_relative_to(folder):
            out.add(str(resolved.relative_to(folder)))
    return out


def _sidecars(nifti_paths: list[str]) -> set[str]:
    """BIDS / dcm2niix JSON sidecars of the NIfTI files: part of their image, not skipped junk (never read:
    they may hold PatientName / PatientID)."""
    return {p.removesuffix(".gz").removesuffix(".nii") + ".json" for p in nifti_paths}


def _collect_images(scan, nifti_modality: str, image_modality: str,
                    max_image_mb: float) -> tuple[list[dict], list[tuple[str, str]]]:
    root = str(scan.root)
    dicom = [dict(h, path_abs=os.path.join(root, h["path"])) for h in scan.headers if h["kind"] == "dicom"]
    remember({h["path_abs"]: h.pop("known") for h in dicom if "known" in h})   # for this process's cache
    images, skipped = assemble(dicom, max_image_mb, decodable=lambda h: decodable(h["path_abs"], h["frames"]))
    nifti = [h for h in scan.headers if h["kind"] == "nifti"]
    for kind, modality in (("nifti", nifti_modality), ("raster", image_modality)):
        records = [_file_record(h, modality) for h in scan.headers if h["kind"] == kind]
        _file_patients(records)
        images += records
    sidecars = _sidecars([h["path"] for h in nifti])
    skipped = [entry for entry in scan.skipped if entry[0] not in sidecars] + skipped
    return sorted(images, key=lambda im: im["paths"][0]), skipped


def _read_labels(labels: Path, join_on: str):
    table = read_labels(labels, join_on)
    clash = [c for c in table.codes.columns if c in COLUMNS or c in ("split", "problems")]
    if clash:
        raise DataError(f"label column(s) {clash} would overwrite manifest columns", where=str(labels),
                        fix="rename those columns in the labels file (e.g. 'label', 'diagnosis')")
    return table


def shown_id(id_column: str, value: str, salt: str) -> str:
    """A label id as it may be printed or logged: paths redacted, raw ids as their pseudonyms."""
    if id_column == "path":
        return display_path(value, salt)
    prefix = PREFIX[id_column]
    return value if value.startswith(prefix) and len(value) == len(prefix) + 12 else pseudonym(prefix, value, salt)


def _nothing_matched(table, images: list[dict], aliases: list[list[str]] | None, folder: Path, salt: str):
    """The error when no label row matches any image: one row, what it was tried as, what images look like."""
    column, first = table.id_column, str(table.codes.index[0])
    if column == "path":
        tried = ", ".join(f"'{display_path(a, salt)}'" for a in aliases[0]) or "nothing inside the folder"
        example = display_path(images[0]["paths"][0], salt)
        detail = (f"row 2 ('{display_path(first, salt)}') was tried as {tried} relative to the scanned folder "
                  f"{display_path(folder.name, salt)} (as written, relative to the labels file, and absolute); "
                  f"image paths look like '{example}'")
    else:
        detail = (f"ids were compared with each image's raw {column} and its pseudonym; row 2 is "
                  f"{shown_id(column, first, salt)}, images' ids look like "
                  f"{pseudonym(PREFIX[column], images[0][KEY_OF[column]], salt)}")
    return DataError(f"no row of the labels file matched any of the {len(images)} images: {detail}",
                     where=str(table.source), fix="write the ids the way the scan sees them (see the example), "
                                                  "or set join_on to the right column")


def _join(images: list[dict], labels: Path | None, join_on: str, salt: str, folder: Path):
    if labels is None:
        return pd.DataFrame(index=range(len(images))), JoinReport(0, len(images)), {}, None, None
    table = _read_labels(labels, join_on)
    aliases = path_aliases(table.codes.index, folder, labels) if table.id_column == "path" else None
    keys = _image_keys(images, table.id_column, salt)
    codes, report = join_labels(table, keys, aliases)
    if images and len(table.codes.index) and len(report.unmatched) == len(table.codes.index):
        raise _nothing_matched(table, images, aliases, folder, salt)
    masks = None if table.masks is None else join_masks(_aliased(table.masks, aliases), keys)
    return codes, report, table.names, table.id_column, masks


def _aliased(masks: pd.Series, aliases: list[list[str]] | None) -> pd.Series:
    """The mask column keyed like the label join: by every alias of each label path."""
    if aliases is None:
        return masks
    return pd.Series({alias: value for value, names in zip(masks.to_numpy(), aliases) for alias in names},
                     dtype=object)


def _unmatched_shown(report: JoinReport, id_column: str | None, salt: str) -> list[str]:
    return [f"{shown_id(id_column, raw, salt)} (line {line})" for raw, line in zip(report.unmatched,
                                                                                  report.unmatched_rows)]


def build_manifest(folder: Path, out_csv: Path, labels: Path | None = None, join_on: str = "auto", salt: str = "",
                   workers: int | None = None, max_image_mb: float = 4096, nifti_modality: str = "MR",
                   image_modality: str = "OT", progress: bool = True) -> ManifestSummary:
    """Scan `folder`, assemble images, join labels; write out_csv + .skipped.csv + .meta.json and their
    identifier-free NAME.shared.* copies (what may be logged or shared)."""
    folder, out_csv = Path(folder).resolve(), Path(out_csv)
    if not folder.is_dir():
        raise DataError(f"not a folder: {folder}", where="FOLDER / data.folder",
                        fix="give the folder that holds the DICOM / NIfTI files")
    # fail fast on a broken labels file, before minutes of scanning; mask files are labels, never images
    masks = _read_labels(labels, join_on).masks if labels is not None else None
    outputs = [out_csv, sidecar(out_csv, ".skipped.csv"), sidecar(out_csv, ".meta.json"), *shared_paths(out_csv)]
    scan = scan_folder(folder, workers=workers, max_image_mb=max_image_mb, progress=progress,
                       exclude=_excluded(folder, labels, *outputs, *mask_files(masks, folder)))
    images, skipped = _collect_images(scan, nifti_modality, image_modality, max_image_mb)
    codes, report, names, id_column, mask_paths = _join(images, labels, join_on, salt, folder)
    df = pd.DataFrame([_row(image, salt) for image in images], columns=COLUMNS + ["split", "problems"])
    df = pd.concat([df.iloc[:, :len(COLUMNS)], codes.set_axis(df.index), df[["split", "problems"]]], axis=1)
    if mask_paths is not None:   # ingest/masks.py: mask, mask_grid, mask_labels and the has_mask label column
        df = attach_masks(df, images, mask_paths, folder)
        codes["has_mask"], names["has_mask"] = df["has_mask"].to_numpy(), {0: "empty", 1: "foreground"}
    by_reason = Counter(reason.split(":")[0] for _, reason in skipped)
    counts = {"files": scan.n_files, "images": len(df), "skipped": dict(by_reason),
              "with_problems": int((df["problems"] != "").sum()), "labelled": report.n_labelled,
              "unlabelled": report.n_unlabelled, "unmatched_labels": len(report.unmatched)}
    meta = {"root": str(folder), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "label_columns": list(codes.columns), "label_names": names, "counts": counts, "join_on": join_on,
            "nifti_modality": nifti_modality, "image_modality": image_modality}
    write_build(df, pd.DataFrame(sorted(skipped), columns=["path", "reason"]), meta, out_csv, salt)
    return ManifestSummary(out_csv, scan.n_files, len(df), dict(by_reason), counts["with_problems"],
                           list(codes.columns), report.n_labelled, report.n_unlabelled,
                           _unmatched_shown(report, id_column, salt))
