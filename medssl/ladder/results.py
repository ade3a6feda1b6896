"""The ladder's results file: one row per finished child run, appended the moment it finishes.

Append-only so a crash loses at most the child that was running; the latest row per child wins when read
back, so a child that failed and later succeeded reads as succeeded. Consumers (report, resume) read it with
`read_results`. Parallel ladders (worker processes or torchrun ranks) write one shard per rank
(`results.rank<r>.csv`) that rank 0 merges into `results.csv` (`merge_shards`).

THE CONTRACT (what the report and any other reader may rely on)

Children. One child = (repeat, rung, seed, arm, protocol). Every arm of one (repeat, rung, seed) uses the
SAME labelled patients (the rung), the same seed and the same test patients (the repeat's test split), so
any two arms of one (repeat, rung, seed) form a paired comparison on identical test images.
  arm       protocol   what it is
  ssl       linear     frozen SSL encoder + logistic-regression probe (C chosen inside the rung)
  ssl       finetune   SSL encoder fine-tuned (epochs chosen inside the rung)
  scratch   finetune   the same network from random init, same schedule and tuning effort as ssl/finetune
  random_features linear  frozen RANDOMLY initialised encoder + the same probe (never called "scratch")
  features  linear     engineered image features (models/engineered.py) + the same probe, C chosen inside the rung

results.csv columns (one row per child; unknown extra columns may appear and must be ignored):
  key                "r<repeat>/<rung>/seed<seed>/<arm>/<protocol>", unique per child
  settings_digest    identity of the settings; rows of another digest are stale (not this ladder's)
  repeat             int, index of the patient-level split repeat (split.repeats); 0 when not repeated
  rung               str, e.g. "per_class_5" = 5 labelled PATIENTS of every class (all their images)
  seed               int, the rung's draw (which patients) and the training seed offset
  arm                ssl | scratch | features | random_features
  protocol           linear | finetune
  init               legacy alias of arm (will be removed; read `arm`)
  status, error      "ok" | "failed"; the failure's first line (metrics are empty on failed rows)
  validation         "inner" (every choice made by cross-validation inside the rung's patients) or
                     "split" (opt-in legacy: the labelled validation split chose epochs/C/threshold)
  labels_note        "" under inner validation; "uses N extra validation labels" under validation: split
  n_labelled_patients  labelled patients of the rung (its budget, all classes)
  n_extra_val_patients labelled validation-split patients used for choices (0 under inner validation)
  n_patients_used    n_labelled_patients + n_extra_val_patients: EVERY labelled patient this child saw
                     outside the test split (training, early stopping, C, threshold, model selection)
  n_labelled         labelled images of the rung used for training
  rung_class_patients JSON {class name: patients in the rung}
  class_names        JSON list: class_names[code] is the name of class code `code` in the predictions
  positive_class     binary: the name of the positive class (the condition; code 1 in the predictions);
                     multi-class: ""
  inner_folds        K of the inner cross-validation (0 under validation: split)
  chosen_epochs      finetune: the epoch of the best mean held-out score (inner CV), at which the fold models
                     are kept as the run's ensemble
  chosen_C           linear/features: the inverse L2 strength chosen (inner CV)
  threshold          binary operating point on the positive-class probability, chosen on out-of-fold
                     predictions of the rung's own patients (inner) or on the validation split (split);
                     NaN for multi-class (argmax)
  val_auroc, val_loss  the selection score behind the choices (out-of-fold under inner validation)
  n_test_patients, n_test_images   size of the repeat's test split
  run_id, model_logged  MLflow child run id ("" without MLflow); whether its model was logged
  predictions        path of the child's test prediction file (below)
  model              the child's model as a local medssl package folder (export/package.py; empty for features)
  bootstrap_seed, bootstrap_n   the per-child patient bootstrap behind the *_ci_low/_ci_high columns
  metrics            binary: auroc auprc balanced_accuracy sensitivity specificity sens_at_spec90
                     sens_at_spec95 f1 brier ece cm_<t>_<p> (+ <name>_ci_low/_ci_high for auroc auprc
                     balanced_accuracy sensitivity specificity f1, per-child patient bootstrap, 95%);
                     multi-class: auroc (macro OvR) balanced_accuracy f1 brier cm_<t>_<p> (+ CIs)
                     All binary metrics describe the POSITIVE class named in positive_class.
  delta_<m>_vs_<arm>[_ci_low|_ci_high]  SSL rows only, m in auroc, balanced_accuracy: this child minus the
                     <arm> child of the same (repeat, rung, seed) (same protocol when that arm has it), on the
                     same test images and patient resamples (deltas.py); one child's, not pooled
  plan_index         the child's place in the ladder's plan (the order results.csv is kept in)

Prediction file (`predictions` column; children/<key with non [A-Za-z0-9_.-] runs as "__">/predictions.csv),
one row per test image, written once the child finished:
  image_id, label (int code, as class_names), patient_id (pseudonymous; the bootstrap's resampling unit),
  score (binary: probability of the positive class = prob_1) or score_<k> (multi-class),
  prob_0 .. prob_<K-1> (class probabilities, rows sum to 1), predicted (code at `threshold` / argmax).
Images of one test split appear in every child of that (repeat) in the same order, so pairing arms is a join
on image_id (or a positional match).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from medssl.ui import console
from medssl.ingest.csv_safe import read_csv, write_csv  # cells that would run as spreadsheet formulas

TEXT_COLUMNS = ("key", "rung", "arm", "protocol", "init", "status", "error", "validation", "labels_note",
                "positive_class", "class_names", "rung_class_patients", "run_id", "settings_digest", "predictions",
                "model")


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
        write_csv(new, results_csv)
    elif set(new.columns) <= set(old.columns):
        new[old.columns.difference(new.columns)] = np.nan
        write_csv(new[list(old.columns)], results_csv, mode="a", header=False)
    else:
        write_csv(pd.concat([old, new], ignore_index=True), results_csv)


def read_results(results_csv: Path, latest: bool = True) -> pd.DataFrame:
    """The latest row per child (a failed child that succeeded on a rerun shows as ok); `latest=False`: every
    row, history of earlier settings included."""
    results_csv = Path(results_csv)
    if not results_csv.is_file() or results_csv.stat().st_size == 0:
        return pd.DataFrame(columns=["key", "status"])
    text = {c: str for c in TEXT_COLUMNS}
    results = read_csv(results_csv, keep_default_na=True, dtype=text)
    for column in TEXT_COLUMNS:  # a class named "1" stays the string "1"; an empty note stays ""
        if column in results:
            results[column] = results[column].fillna("")
    return results.drop_duplicates("key", keep="last").reset_index(drop=True) if latest else results


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


def write_predictions(path: Path, ids, y, groups, probs: np.ndarray, threshold: float) -> Path:
    """The child's test prediction file, in the format documented above (overwrites write_evaluation's)."""
    probs = np.asarray(probs, float)  # (N, K)
    frame = pd.DataFrame({"image_id": list(ids), "label": np.asarray(y, int), "patient_id": list(groups)})
    if probs.shape[1] == 2:
        frame["score"] = probs[:, 1]
        frame["predicted"] = (probs[:, 1] >= threshold).astype(int)
    else:
        for k in range(probs.shape[1]):
            frame[f"score_{k}"] = probs[:, k]
        frame["predicted"] = probs.argmax(axis=1)
    for k in range(probs.shape[1]):
        frame[f"prob_{k}"] = probs[:, k]
    write_csv(frame, path)
    return Path(path)


def shard_path(results_csv: Path, rank: int) -> Path:
    return Path(results_csv).with_name(f"{Path(results_csv).stem}.rank{rank}.csv")


def merge_shards(results_csv: Path, world: int) -> None:
    """Fold the ranks' shard files into results.csv (latest row per key wins) and remove them. Rows keep the
    plan's order whatever rank ran them, so a parallel ladder's file reads like a serial one's."""
    results_csv = Path(results_csv)
    shards = [shard_path(results_csv, r) for r in range(world) if shard_path(results_csv, r).is_file()]
    if not shards:
        return
    frames = [read_results(results_csv)] + [read_results(s) for s in shards]
    merged = pd.concat([f for f in frames if len(f)], ignore_index=True).drop_duplicates("key", keep="last")
    if "plan_index" in merged:
        merged = merged.sort_values("plan_index", kind="stable")
    tmp = results_csv.with_name(results_csv.name + ".tmp")
    write_csv(merged, tmp)
    tmp.replace(results_csv)  # atomic: a crash while merging leaves the old file and the shards
    for shard in shards:
        shard.unlink()
