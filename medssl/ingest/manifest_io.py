"""Manifest files: NAME.csv + NAME.meta.json (+ NAME.skipped.csv), and their shareable copies.

Local files keep the real relative paths (the loader opens them). What is logged to MLflow or shared is the
`NAME.shared.*` set written beside them: the same rows with `paths` (and the skipped report's paths)
through `redact.display_path`, and a meta without the absolute root. Every CSV goes through csv_safe, so a
file or label name starting with '=' cannot run as a formula in a spreadsheet. All of a build's files are
encoded first and written last, so a failure cannot leave a CSV without its meta or skipped report.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pandas as pd

from medssl.errors import DataError
from medssl.ingest.csv_safe import csv_text, read_csv
from medssl.ingest.redact import display_path

FORMAT = "medssl-manifest/1"
COLUMNS = ["image_id", "patient_id", "study_id", "series_id", "format", "modality", "body_part", "spatial_dims",
           "channels", "shape", "spacing", "orientation", "photometric", "n_files", "paths"]
INT_COLUMNS = ("spatial_dims", "channels", "n_files")
SHARED = ".shared"   # NAME.shared.csv / NAME.shared.skipped.csv / NAME.shared.meta.json
PATH_COLUMNS = ("paths", "mask")  # columns holding source paths ('|'-separated): redacted in the shared copies


def sidecar(path: Path, suffix: str) -> Path:
    return Path(path).with_suffix(suffix)


def shared_paths(path: Path) -> list[Path]:
    """The shareable copies of manifest `path`: csv, skipped csv, meta."""
    return [sidecar(path, SHARED + s) for s in (".csv", ".skipped.csv", ".meta.json")]


def _write_all(files: dict[Path, bytes]) -> None:
    """Write every file to a temporary name first, then move them all into place."""
    for path, data in files.items():
        Path(path).with_name(Path(path).name + ".tmp").write_bytes(data)
    for path in files:
        os.replace(Path(path).with_name(Path(path).name + ".tmp"), path)


def _manifest_files(df: pd.DataFrame, meta: dict, path: Path) -> tuple[dict, dict[Path, bytes]]:
    data = csv_text(df).encode()
    meta = {**meta, "digest": hashlib.sha256(data).hexdigest(), "format": FORMAT}
    return meta, {path: data, sidecar(path, ".meta.json"): json.dumps(meta, indent=2, default=str).encode()}


def write_manifest(df: pd.DataFrame, meta: dict, path: Path) -> dict:
    """Write NAME.csv and NAME.meta.json; meta["digest"] becomes the SHA-256 of the CSV bytes. Returns meta."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta, files = _manifest_files(df, meta, path)
    _write_all(files)
    return meta


def _shared_files(df: pd.DataFrame, skipped: pd.DataFrame, meta: dict, path: Path, salt: str) -> dict[Path, bytes]:
    """Identifier-free copies: paths through display_path, no absolute root."""
    def shown(paths):
        return "|".join(display_path(p, salt) for p in str(paths).split("|")) if paths else paths

    df = df.assign(**{c: df[c].map(shown) for c in PATH_COLUMNS if c in df.columns})
    skipped = skipped.assign(path=skipped["path"].map(shown))
    meta = {k: v for k, v in meta.items() if k != "root"} | {"paths": "date-like and id-like parts replaced"}
    csv, skipped_csv, meta_json = shared_paths(path)
    return {csv: csv_text(df).encode(), skipped_csv: csv_text(skipped).encode(),
            meta_json: json.dumps(meta, indent=2, default=str).encode()}


def write_build(df: pd.DataFrame, skipped: pd.DataFrame, meta: dict, path: Path, salt: str) -> dict:
    """A build's manifest, meta, skipped report and their shared copies, all or nothing. Returns meta."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta, files = _manifest_files(df, meta, path)
    files[sidecar(path, ".skipped.csv")] = csv_text(skipped).encode()
    files.update(_shared_files(df, skipped, meta, path, salt))
    _write_all(files)
    return meta


def read_manifest(path: Path) -> tuple[pd.DataFrame, dict]:
    """(rows, meta). Integer columns come back as int, label columns as nullable Int64 (<NA> = unlabelled)."""
    path, meta_path = Path(path), sidecar(Path(path), ".meta.json")
    if not path.is_file() or not meta_path.is_file():
        raise DataError(f"manifest not found: {path if not path.is_file() else meta_path}", where=str(path),
                        fix="build it first: medssl manifest build FOLDER --out NAME.csv")
    meta = json.loads(meta_path.read_text())
    df = read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"manifest lacks columns {missing}", where=str(path), fix="rebuild the manifest")
    for column in INT_COLUMNS:
        df[column] = df[column].astype(int)
    for column in meta.get("label_columns", []):
        df[column] = pd.to_numeric(df[column].replace("", None)).astype("Int64")
    meta["label_names"] = {c: {int(k): v for k, v in names.items()} for c, names in meta.get("label_names", {}).items()}
    return df, meta
