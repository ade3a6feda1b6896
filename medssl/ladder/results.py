"""The ladder's results file: one row per finished child run, appended the moment it finishes.

Append-only so a crash loses at most the child that was running; the latest row per child wins when read
back, so a child that failed and later succeeded reads as succeeded. Consumers (report, resume) read it with
`read_results`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from medssl.ui import console


def finished_keys(results_csv: Path, digest: str | None = None) -> set[str]:
    """Children that finished ("ok"), under the same settings when `digest` is given."""
    results = read_results(results_csv)
    if not len(results):
        return set()
    done = results["status"] == "ok"
    if digest is not None:
        done &= results.get("settings_digest", pd.Series("", index=results.index)).astype(str) == digest
    return set(results.loc[done, "key"])


def append_result(results_csv: Path, row: dict) -> None:
    """Append one row; new metric columns widen the file (rewritten), so rows never misalign."""
    old = read_results(results_csv)
    new = pd.DataFrame([row])
    if not len(old):  # first row: no empty frame to concatenate with (that would turn ints into floats)
        new.to_csv(results_csv, index=False)
    elif set(new.columns) <= set(old.columns):
        new[old.columns.difference(new.columns)] = np.nan
        new[list(old.columns)].to_csv(results_csv, mode="a", header=False, index=False)
    else:
        pd.concat([old, new], ignore_index=True).to_csv(results_csv, index=False)


def read_results(results_csv: Path) -> pd.DataFrame:
    """All rows, the latest per child (a failed child that succeeded on a rerun shows as ok)."""
    results_csv = Path(results_csv)
    if not results_csv.is_file() or results_csv.stat().st_size == 0:
        return pd.DataFrame(columns=["key", "status"])
    results = pd.read_csv(results_csv, keep_default_na=True)
    return results.drop_duplicates("key", keep="last").reset_index(drop=True)


def settings_digest(settings: dict, encoder_source: str) -> str:
    """Identity of the settings a run was made under, plus the encoder (its file's bytes, or its MLflow URI).
    Rows of another digest are not "finished": a ladder rerun after a change redoes them."""
    source = Path(encoder_source)
    encoder = hashlib.sha256(source.read_bytes()).hexdigest() if source.is_file() else str(encoder_source)
    return hashlib.sha256(json.dumps({**settings, "encoder": encoder}, sort_keys=True).encode()).hexdigest()[:16]


def print_failures(results: pd.DataFrame) -> None:
    failed = results[results["status"] != "ok"]
    if len(failed):
        console.print(f"[red]{len(failed)} of {len(results)} ladder runs failed[/] (kept in results.csv):")
        for _, row in failed.iterrows():
            console.print(f"  {row['key']}: {row['error']}")
