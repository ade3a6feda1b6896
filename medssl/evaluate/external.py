"""External sites: every arm's kept models scored on another site's (already cached) images.

Labels are matched to the training classes by NAME, never by code (codes follow each manifest's own
alphabet): a site whose class names differ from training is a clear error listing both. Each child's model
is found, in this order, as
  1. results.csv `model` (a path or an MLflow URI), when the ladder records one;
  2. `model.pt` (a plain-dict `save_classifier` file) beside the child's predictions.csv;
  3. `runs:/<run_id>/model` when the child logged its model to MLflow (`model_logged`).
A child with none of them (e.g. from a ladder written before every arm, the features arm included, kept its
model) is listed as not scored, with the reason; one model that fails to load never stops the others.
The site's prediction files have the ladder's format, so the report pools and pairs them the same way.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from medssl.errors import DataError
from medssl.ingest.csv_safe import write_csv
from medssl.evaluate.predict import load_model, prediction_frame, score_dataset
from medssl.ui import console


def class_names(meta: dict, df: pd.DataFrame, label: str) -> dict[int, str]:
    """{code: name} of a manifest's label column (numeric labels without names: their codes as text)."""
    from medssl.cohort.splits import label_codes
    names = (meta.get("label_names") or {}).get(label)
    if names:
        return {int(k): str(v) for k, v in names.items()}
    codes = label_codes(df, label).dropna().astype(int)
    return {int(c): str(c) for c in sorted(codes.unique())}


def training_codes(df: pd.DataFrame, meta: dict, label: str, training_names: dict[int, str], site: str) -> pd.Series:
    """The site's labels as TRAINING class codes (Int64, <NA> = unlabelled), matched by class name."""
    from medssl.cohort.splits import label_codes
    names = class_names(meta, df, label)
    if set(names.values()) != set(training_names.values()):
        raise DataError(f"the class names of external site '{site}' differ from training: site "
                        f"{sorted(names.values())}, training {sorted(training_names.values())}",
                        where=f"evaluate.external[{site}].labels (column '{label}')",
                        fix="use the training class names in the site's labels (rename them in its labels CSV)")
    to_training = {code: {v: k for k, v in training_names.items()}[name] for code, name in names.items()}
    return label_codes(df, label).map(lambda c: to_training.get(int(c)) if pd.notna(c) else pd.NA).astype("Int64")


def model_source(row: pd.Series) -> str | None:
    kept = row.get("model")
    if isinstance(kept, str) and kept and (kept.startswith(("runs:/", "models:/")) or Path(kept).exists()):
        return kept
    predictions = row.get("predictions")
    if isinstance(predictions, str) and predictions and (Path(predictions).parent / "model.pt").is_file():
        return str(Path(predictions).parent / "model.pt")
    if str(row.get("model_logged", "")).lower() == "true" and isinstance(row.get("run_id"), str) and row["run_id"]:
        return f"runs:/{row['run_id']}/model"
    return None


def score_site(site: str, results: pd.DataFrame, cache, df: pd.DataFrame, codes: pd.Series, out_dir: Path,
               tracking_uri: str | None = None, batch_size: int = 16) -> pd.DataFrame:
    """Score every finished child on the site's labelled, cached images. Returns (and writes
    out_dir/scores.csv) the children's rows with `predictions` pointing at the site's prediction files and
    `status` "ok", or "not scored" with the reason in `error`."""
    out_dir = Path(out_dir)
    labelled = df[codes.notna()].assign(_code=codes[codes.notna()].astype(int))
    labelled = labelled[[cache.has(str(i)) for i in labelled["image_id"]]]
    if labelled.empty:
        raise DataError(f"external site '{site}' has no labelled image in its cache",
                        where=f"evaluate.external[{site}]",
                        fix="check the site's labels CSV and the preprocessing failures printed above")
    rows = []
    ok = results[results["status"] == "ok"] if "status" in results else results
    for _, row in ok.drop_duplicates("key", keep="last").iterrows():
        rows.append({**row.to_dict(), **_score_child(row, labelled, cache, out_dir, tracking_uri, batch_size)})
    scored = pd.DataFrame(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(scored, out_dir / "scores.csv")
    missed = scored[scored["status"] != "ok"] if len(scored) else scored
    if len(missed):
        console.print(f"[yellow]{site}: {len(missed)} of {len(scored)} runs not scored[/] "
                      f"(e.g. {missed['key'].iloc[0]}: {missed['error'].iloc[0]})")
    return scored


def _score_child(row, labelled: pd.DataFrame, cache, out_dir: Path, tracking_uri, batch_size: int) -> dict:
    source = model_source(row)
    if source is None:
        return {"status": "not scored", "error": "no model kept for this run", "predictions": ""}
    try:
        model = load_model(source, tracking_uri)
        ids, probs = score_dataset(model, _dataset(cache, labelled, model), batch_size)
    except Exception as err:  # noqa: BLE001 - one model that cannot load or run never stops the others
        return {"status": "not scored", "error": str(err).splitlines()[0][:300], "predictions": ""}
    by_id = labelled.set_index(labelled["image_id"].astype(str))
    threshold = float(getattr(model, "threshold", 0.5))
    frame = prediction_frame(ids, probs, threshold)
    frame.insert(1, "label", by_id.loc[ids, "_code"].to_numpy(int))
    frame.insert(2, "patient_id", by_id.loc[ids, "patient_id"].tolist())
    for k in range(probs.shape[1]):
        frame[f"prob_{k}"] = probs[:, k]  # (N, K) class probabilities, as the ladder writes them
    path = out_dir / "children" / _safe(row["key"]) / "predictions.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_csv(frame, path)
    return {"status": "ok", "error": "", "predictions": str(path), "model_source": source,
            "n_external_images": len(ids), "n_external_patients": int(frame["patient_id"].nunique())}


def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "__", str(key))


def _dataset(cache, labelled: pd.DataFrame, model):
    from medssl.train.loaders import ImageDataset
    ids = labelled["image_id"].astype(str).tolist()
    return ImageDataset(cache, ids, labelled["_code"].astype(int).tolist(),
                        spatial_dims=getattr(model, "spatial_dims", None))

