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
- Ladders are drawn from the labelled patients of the training split only. For one seed each rung is a prefix of
  one per-class random order of PATIENTS, hence nested in the next rung, and every rung holds every class. The
  unit is the labelled patient (labels are per patient; a patient may have several studies): per_class=N means
  N patients of EVERY class (their stratum, as for the splits), each with all its labelled training images,
  capped by what the training split holds; fractions are taken per class, at least one patient each.
- Repeats (`split.repeats`): repeat r is another patient-level split (repeat 0 = the split of `seed`, as without
  repeats) with its own rungs. The splits file's `splits` (the `split` column stages read) holds repeat 0,
  except that a patient who is in training in repeat 0 but held out (val/test) in another repeat reads
  "heldout": pretraining (train and "" only) then never sees an image of a patient any repeat evaluates on.
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

SPLITS_FORMAT = "medssl-splits/2"  # 2: repeats, patient rungs, positive class
HELDOUT = "heldout"  # manifest split of a repeat-0 training patient evaluated in another repeat


@dataclass(frozen=True)
class Rung:
    """One label budget for one seed: the labelled training images a fine-tuning run may use."""
    name: str                       # "frac_0.05" or "per_class_10"; same name across seeds
    seed: int
    image_ids: tuple[str, ...]
    counts: dict = field(default_factory=dict, compare=False)   # {class code: patients}
    repeat: int = 0                 # which patient-level split (split.repeats) the rung is drawn from


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
                  test_fraction: float, repeat: int = 0) -> pd.Series:
    """"train" | "val" | "test" | "" per row (index of `df`), by patient, stratified by the patient's label.

    Patients with no labelled image get "" (they still feed pretraining). Deterministic in (`seed`, `repeat`);
    repeat 0 is the split the same seed gave before repeats existed.
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
        # per class: a new class does not reshuffle others; a repeat is one more entropy word
        rng = np.random.default_rng([seed, int(code)] + ([int(repeat)] if repeat else []))
        order = [order[i] for i in rng.permutation(len(order))]
        n_val, n_test = _allocate(len(order), val_fraction, test_fraction)
        for i, patient in enumerate(order):
            assigned[patient] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return df["patient_id"].map(assigned).fillna("").astype(str).rename("split")


def assign_repeats(df: pd.DataFrame, label: str, seed: int, val_fraction: float, test_fraction: float,
                   repeats: int) -> list[pd.Series]:
    """One `assign_splits` per repeat (index of `df`)."""
    return [assign_splits(df, label, seed, val_fraction, test_fraction, r) for r in range(repeats)]


def manifest_split(assignments: Sequence[pd.Series]) -> pd.Series:
    """The manifest's `split` column: repeat 0, with HELDOUT for its training rows held out in another repeat."""
    first = assignments[0].copy()
    elsewhere = pd.concat([a.isin(["val", "test"]) for a in assignments[1:]], axis=1).any(axis=1) \
        if len(assignments) > 1 else pd.Series(False, index=first.index)
    first[(first == "train") & elsewhere] = HELDOUT
    return first


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
    """Patients per class in one rung. Fractions are taken per class (stratified) with at least one patient of
    each class; per_class=N means N of every class, capped by what the training split holds."""
    if fraction is not None:
        return {c: min(n, max(1, round(fraction * n))) for c, n in available.items()}
    return {c: min(n, per_class) for c, n in available.items()}


def build_ladder(df: pd.DataFrame, label: str, fractions: Sequence[float] | None = None,
                 per_class: Sequence[int] | None = None, seeds: Sequence[int] = (0, 1, 2),
                 split: pd.Series | None = None, repeat: int = 0) -> list[Rung]:
    """Nested labelled subsets of the training split, counted in patients: for each seed, rungs in increasing
    budget, each a superset of the previous one and holding every class of the labelled data.
    `split`: the repeat's assignment (default `df["split"]`)."""
    if (fractions is None) == (per_class is None):
        raise DataError("give exactly one of fractions or per_class", where="split.ladder")
    budgets = sorted(fractions) if fractions is not None else sorted(per_class)
    if any(b <= 0 for b in budgets) or (fractions is not None and any(f > 1 for f in budgets)):
        raise DataError(f"ladder budgets must be positive (fractions at most 1): {budgets}", where="split.ladder")
    codes = label_codes(df, label)
    split = df["split"] if split is None else split
    train = (split.fillna("") == "train") & codes.notna()
    strata = _patient_strata(df[train], codes[train])                     # {patient: class}
    images = df[train].groupby("patient_id")["image_id"].apply(sorted)   # a patient's labelled training images
    path_of = _stable_keys(df, "patient_id")  # salt-free order, as for the splits
    by_class = {int(c): sorted(strata.index[strata == c], key=lambda p: (path_of.get(p, ""), p))
                for c in sorted(codes.dropna().unique())}
    rungs: list[Rung] = []
    for seed in seeds:
        orders = {c: _shuffled(ids, seed, c, repeat) for c, ids in by_class.items()}
        for budget in budgets:
            name = f"frac_{budget:g}" if fractions is not None else f"per_class_{budget}"
            for c, ids in orders.items():
                if not ids:
                    raise DataError(f"class {c} has no labelled patient in the training split, so rung '{name}' "
                                    f"cannot contain it", where=f"label '{label}', rung {name}, seed {seed}",
                                    fix="add images of that class, lower split.test_fraction/val_fraction, "
                                        "or merge the class")
            counts = _rung_counts({c: len(ids) for c, ids in orders.items()},
                                  budget if fractions is not None else None,
                                  budget if per_class is not None else None)
            chosen = tuple(sorted(i for c, ids in orders.items() for p in ids[:counts[c]] for i in images[p]))
            rungs.append(Rung(name, int(seed), chosen, counts, int(repeat)))
    return rungs


def _stable_keys(df: pd.DataFrame, by: str) -> dict[str, str]:
    """{id: the smallest relative source path of its images} (a manifest without paths: the id itself)."""
    if "paths" not in df.columns:
        return {}
    return df.groupby(by)["paths"].min().astype(str).to_dict()


def _shuffled(ids: list[str], seed: int, code: int, repeat: int = 0) -> list[str]:
    # 7: a stream different from the split's; a repeat adds one entropy word
    rng = np.random.default_rng([int(seed), int(code), 7] + ([int(repeat)] if repeat else []))
    return [ids[i] for i in rng.permutation(len(ids))]


# ------------------------------------------------------------------------------------------ files
def _assignment_digest(splits: dict[str, str]) -> str:
    text = json.dumps(sorted(splits.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_splits(path: Path | str, df: pd.DataFrame, rungs: Sequence[Rung], settings: dict,
                 repeats: Sequence[pd.Series] | None = None, classes: dict | None = None) -> Path:
    """JSON next to the manifest ("NAME.splits.json"): the settings, every image's split (per repeat), every
    rung and the class coding (`classes`: {"names": {code: name}, "positive": code or None}), so a later run
    reuses exactly the same subsets (and `read_splits(expect=...)` notices changed settings)."""
    path = Path(path)
    ids = df["image_id"].astype(str)
    repeats = list(repeats) if repeats is not None else [df["split"]]
    per_repeat = [dict(zip(ids, r.fillna("").astype(str))) for r in repeats]
    # "splits": df["split"], what pretraining may see (manifest_split: HELDOUT marks repeat-0 training patients
    # that another repeat evaluates on); "repeats": every repeat's own train / val / test
    combined = dict(zip(ids, df["split"].fillna("").astype(str)))
    doc = {"format": SPLITS_FORMAT, "settings": settings, "digest": _assignment_digest(combined),
           "splits": combined, "repeats": per_repeat, "rungs": [_rung_json(r) for r in rungs],
           "classes": {"names": {str(k): v for k, v in (classes or {}).get("names", {}).items()},
                       "positive": (classes or {}).get("positive")}}
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
    """{"settings", "splits": {image_id: split} (repeat 0, HELDOUT where another repeat evaluates), "repeats":
    [{image_id: split}] (each repeat's own), "rungs": [Rung],
    "classes": {"names": {code: name}, "positive": code | None}, "digest"}. With `expect`, a DataError if the
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
    rungs = [Rung(r["name"], r["seed"], tuple(r["image_ids"]), {int(k): v for k, v in r["counts"].items()},
                  int(r.get("repeat", 0))) for r in doc["rungs"]]
    classes = {"names": {int(k): v for k, v in doc["classes"]["names"].items()},
               "positive": doc["classes"]["positive"]}
    return {"settings": doc["settings"], "splits": doc["splits"], "repeats": doc["repeats"], "rungs": rungs,
            "classes": classes, "digest": doc["digest"]}
