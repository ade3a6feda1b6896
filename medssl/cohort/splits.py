"""Patient-level train/val/test splits and nested label ladders.

Rules (they hold for every pipeline):
- A patient never spans two splits: the unit of assignment is the patient, not the image.
- Stratification uses one label per patient: the rarest class (by image count) among the patient's labelled
  images, so the few patients carrying a rare condition are spread over train/val/test like the others.
- Unlabelled images of a patient who has labelled images follow that patient's split (a patient never spans
  two splits). Patients without any labelled image get split "" (no fine-tuning / evaluation role).
- Pretraining may see split "train" and "" only (`pretrain_ids`), never val/test. Because unlabelled images of
  val/test patients carry "val"/"test", no image of an evaluation patient reaches the SSL encoder.
  Consequence for readers: rows with split "val"/"test" can be unlabelled; use `labelled_ids` to pick
  evaluation images.
- Ladders are drawn from the labelled images of the training split only. For one seed each rung is a prefix of
  one per-class random order, hence nested in the next rung, and every rung holds every class. The unit is
  the labelled image (what an annotator labels). per_class=N means N images of EVERY class (no extra
  negatives), capped by what the training split holds; fractions are taken per class, at least one each.
- Everything is a pure function of (manifest rows, settings, seed): row order does not matter.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from medssl.errors import DataError

SPLITS_FORMAT = "medssl-splits/1"


@dataclass(frozen=True)
class Rung:
    """One label budget for one seed: the labelled training images a fine-tuning run may use."""
    name: str                       # "frac_0.05" or "per_class_10"; same name across seeds
    seed: int
    image_ids: tuple[str, ...]
    counts: dict = field(default_factory=dict, compare=False)   # {class code: images}


# ------------------------------------------------------------------------------------------ labels
def label_codes(df: pd.DataFrame, label: str) -> pd.Series:
    """Integer class codes (nullable Int64); empty / NaN = unlabelled. Non-integer labels are a DataError."""
    if label not in df.columns:
        raise DataError(f"the manifest has no label column '{label}'", where="split.label",
                        fix=f"choose one of the columns: {', '.join(map(str, df.columns))}")
    raw = df[label].replace("", np.nan)
    codes = pd.to_numeric(raw, errors="coerce")
    bad = raw.notna() & (codes.isna() | (codes.fillna(0) % 1 != 0))
    if bad.any():
        example = df.loc[bad, "image_id"].iloc[0] if "image_id" in df else bad.idxmax()
        raise DataError(f"label column '{label}' holds non-integer values (e.g. {raw[bad].iloc[0]!r})",
                        where=f"manifest row {example}", fix="labels must be integer class codes (0, 1, ...)")
    return codes.astype("Int64")


def _patient_strata(df: pd.DataFrame, codes: pd.Series) -> pd.Series:
    """{patient_id: stratum}: the rarest class among the patient's labelled images (rare ones stay spread)."""
    labelled = codes.notna()
    frequency = codes[labelled].value_counts()
    rarity = codes[labelled].map(frequency)
    frame = pd.DataFrame({"patient": df.loc[labelled, "patient_id"], "code": codes[labelled], "rarity": rarity})
    frame = frame.sort_values(["patient", "rarity", "code"])
    return frame.groupby("patient", sort=True)["code"].first()


# ------------------------------------------------------------------------------------------ splits
def _allocate(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(n_val, n_test) patients of one stratum. Rounded shares, but a stratum with enough patients puts at
    least one in test, then val, and always keeps one for training (a rare class must be learnable)."""
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    if test_fraction > 0 and n_test == 0 and n >= 2:
        n_test = 1
    if val_fraction > 0 and n_val == 0 and n >= 3:
        n_val = 1
    while n_val + n_test > max(n - 1, 0):
        if n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def assign_splits(df: pd.DataFrame, label: str, seed: int, val_fraction: float,
                  test_fraction: float) -> pd.Series:
    """"train" | "val" | "test" | "" per row (index of `df`), by patient, stratified by the patient's label.

    Patients with no labelled image get "" (they still feed pretraining). Deterministic in `seed`.
    """
    if val_fraction + test_fraction >= 1:
        raise DataError(f"val_fraction + test_fraction = {val_fraction + test_fraction} leaves no training data",
                        where="split.val_fraction / split.test_fraction", fix="make their sum below 1")
    codes = label_codes(df, label)
    strata = _patient_strata(df, codes)
    assigned: dict[str, str] = {}
    # order patients by their first file's relative path, not by their pseudonym: the pseudonym depends on
    # the salt, so the same data and seed would otherwise give another split on every machine
    first_path = _stable_keys(df, "patient_id")
    for code, patients in strata.groupby(strata, sort=True):
        order = sorted(patients.index, key=lambda patient: (first_path.get(patient, ""), patient))
        rng = np.random.default_rng([seed, int(code)])     # per class: a new class does not reshuffle others
        order = [order[i] for i in rng.permutation(len(order))]
        n_val, n_test = _allocate(len(order), val_fraction, test_fraction)
        for i, patient in enumerate(order):
            assigned[patient] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return df["patient_id"].map(assigned).fillna("").astype(str).rename("split")


def pretrain_ids(df: pd.DataFrame) -> list[str]:
    """Images SSL pretraining may see: the training split and patients without labels, never val/test."""
    split = df["split"].fillna("").astype(str) if "split" in df else pd.Series("", index=df.index)
    return df.loc[split.isin(["train", ""]), "image_id"].tolist()


def labelled_ids(df: pd.DataFrame, label: str, split: str) -> list[str]:
    """Labelled images of one split (val/test rows may be unlabelled images of evaluation patients)."""
    codes = label_codes(df, label)
    return df.loc[(df["split"].fillna("") == split) & codes.notna(), "image_id"].tolist()


# ------------------------------------------------------------------------------------------ ladders
def _rung_counts(available: dict[int, int], fraction: float | None, per_class: int | None) -> dict[int, int]:
    """Images per class in one rung. Fractions are taken per class (stratified) with at least one image of
    each class; per_class=N means N of every class, capped by what the training split holds."""
    if fraction is not None:
        return {c: min(n, max(1, round(fraction * n))) for c, n in available.items()}
    return {c: min(n, per_class) for c, n in available.items()}


def build_ladder(df: pd.DataFrame, label: str, fractions: Sequence[float] | None = None,
                 per_class: Sequence[int] | None = None, seeds: Sequence[int] = (0, 1, 2)) -> list[Rung]:
    """Nested labelled subsets of the training split: for each seed, rungs in increasing budget, each a
    superset of the previous one and holding every class of the labelled data. Needs `df["split"]`."""
    if (fractions is None) == (per_class is None):
        raise DataError("give exactly one of fractions or per_class", where="split.ladder")
    budgets = sorted(fractions) if fractions is not None else sorted(per_class)
    if any(b <= 0 for b in budgets) or (fractions is not None and any(f > 1 for f in budgets)):
        raise DataError(f"ladder budgets must be positive (fractions at most 1): {budgets}", where="split.ladder")
    codes = label_codes(df, label)
    train = (df["split"].fillna("") == "train") & codes.notna()
    path_of = _stable_keys(df, "image_id")  # salt-free order, as for the splits
    by_class = {int(c): sorted(df.loc[train & (codes == c), "image_id"], key=lambda i: (path_of.get(i, ""), i))
                for c in sorted(codes.dropna().unique())}
    rungs: list[Rung] = []
    for seed in seeds:
        orders = {c: _shuffled(ids, seed, c) for c, ids in by_class.items()}
        for budget in budgets:
            name = f"frac_{budget:g}" if fractions is not None else f"per_class_{budget}"
            for c, ids in orders.items():
                if not ids:
                    raise DataError(f"class {c} has no labelled image in the training split, so rung '{name}' "
                                    f"cannot contain it", where=f"label '{label}', rung {name}, seed {seed}",
                                    fix="add images of that class, lower split.test_fraction/val_fraction, "
                                        "or merge the class")
            counts = _rung_counts({c: len(ids) for c, ids in orders.items()},
                                  budget if fractions is not None else None,
                                  budget if per_class is not None else None)
            chosen = tuple(sorted(i for c, ids in orders.items() for i in ids[:counts[c]]))
            rungs.append(Rung(name, int(seed), chosen, counts))
    return rungs


def _stable_keys(df: pd.DataFrame, by: str) -> dict[str, str]:
    """{id: the smallest relative source path of its images} (a manifest without paths: the id itself)."""
    if "paths" not in df.columns:
        return {}
    return df.groupby(by)["paths"].min().astype(str).to_dict()


def _shuffled(ids: list[str], seed: int, code: int) -> list[str]:
    rng = np.random.default_rng([int(seed), int(code), 7])   # 7: a stream different from the split's
    return [ids[i] for i in rng.permutation(len(ids))]


# ------------------------------------------------------------------------------------------ files
def _assignment_digest(splits: dict[str, str]) -> str:
    text = json.dumps(sorted(splits.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_splits(path: Path | str, df: pd.DataFrame, rungs: Sequence[Rung], settings: dict) -> Path:
    """JSON next to the manifest ("NAME.splits.json"): the settings, every image's split and every rung, so a
    later run reuses exactly the same subsets (and `read_splits(expect=...)` notices changed settings)."""
    path = Path(path)
    splits = dict(zip(df["image_id"].astype(str), df["split"].fillna("").astype(str)))
    doc = {"format": SPLITS_FORMAT, "settings": settings, "digest": _assignment_digest(splits),
           "splits": splits, "rungs": [_rung_json(r) for r in rungs]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
    tmp.replace(path)            # atomic: a crash never leaves half a file that later runs would trust
    return path


def _rung_json(rung: Rung) -> dict:
    doc = asdict(rung)
    doc["image_ids"] = list(rung.image_ids)
    doc["counts"] = {str(k): v for k, v in rung.counts.items()}
    return doc


def read_splits(path: Path | str, expect: dict | None = None) -> dict:
    """{"settings", "splits": {image_id: split}, "rungs": [Rung], "digest"}. With `expect`, a DataError if the
    file was written with other settings (the subsets would not be the ones asked for)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"splits file not found: {path}", where=str(path), fix="run the 'splits' stage first")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"splits file is not valid JSON: {err}", where=str(path),
                        fix="delete it and run the 'splits' stage again") from None
    if doc.get("format") != SPLITS_FORMAT:
        raise DataError(f"unknown splits format {doc.get('format')!r}", where=str(path),
                        fix="delete it and run the 'splits' stage again")
    if expect is not None and doc["settings"] != expect:
        changed = sorted(k for k in set(doc["settings"]) | set(expect) if doc["settings"].get(k) != expect.get(k))
        raise DataError(f"the splits were made with other settings (changed: {', '.join(changed)})",
                        where=str(path), fix="run the 'splits' stage again, or restore the old settings")
    rungs = [Rung(r["name"], r["seed"], tuple(r["image_ids"]), {int(k): v for k, v in r["counts"].items()})
             for r in doc["rungs"]]
    return {"settings": doc["settings"], "splits": doc["splits"], "rungs": rungs, "digest": doc["digest"]}
