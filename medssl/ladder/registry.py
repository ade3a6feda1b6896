"""Trained classifiers in MLflow: the model of every ladder run, and the best one per rung in the registry."""
from __future__ import annotations

import logging
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
from medssl.ui import console

EXAMPLE_PATH = "/path/to/a/dicom_series_folder_or_nifti_file"  # shape of a request; no patient's path


def log_model(tracker, model, description: dict) -> None:
    """The model as a medssl package (safetensors + JSON: no pickle) wrapped in an MLflow pyfunc that takes
    scans (medssl/export), under artifact path "model", with its signature and model card.
    Saved locally, then sent as artifacts through the tracker (its outbox survives a server outage)."""
    from medssl.export.card import model_card
    from medssl.export.package import read_spec, save_package
    from medssl.export.pyfunc import save_pyfunc
    with tempfile.TemporaryDirectory() as tmp, _quiet("mlflow"):
        package = save_package(f"{tmp}/medssl_model", model, description["spec"])
        folder = save_pyfunc(package, Path(tmp) / "model", example_path=EXAMPLE_PATH)
        (folder / "model_card.md").write_text(model_card(read_spec(package), **description["card"]))
        tracker.log_artifact(folder, "model")


def model_description(ctx, child, values: dict, test_ids: list[str]) -> dict:
    """The spec (architecture, preprocessing, labels in the ladder's coding: binary positive class = code 1,
    lineage with the labelled patients used) and model-card facts of one child. Paired deltas between arms
    are the report's (pooled over seeds and repeats), so the card of one child carries none."""
    rung, names = child.rung, [str(n) for n in ctx.class_names]
    spec = {"architecture": {"encoder": ctx.encoder_cfg.model_dump(mode="json"), "spatial_dims": ctx.spatial_dims,
                             "img_size": ctx.img_size, "in_channels": ctx.encoder_cfg.in_channels,
                             "n_classes": ctx.n_classes, **_pooling_spec(ctx)},
            "preprocess": ctx.cache.cfg.model_dump(mode="json", exclude={"cache_dir"}),
            "labels": {"column": ctx.data.get("label", "label"), "names": names, "positive": ctx.positive or None},
            "inputs": {"modalities": ctx.data.get("modalities", []), "image_dims": ctx.data.get("image_dims", [])},
            "lineage": {"pretrain_run_id": str(ctx.info.get("run_id") or ""),
                        "manifest_digest": str(ctx.info.get("manifest_digest") or ""), "rung": rung.name,
                        "arm": child.arm, "seed": rung.seed, "protocol": child.protocol,
                        "labelled_patients": len({ctx.patients[i] for i in rung.image_ids})}}
    card = {"data": {"labelled patients in the rung": spec["lineage"]["labelled_patients"],
                     "test patients (internal)": len({ctx.patients[i] for i in test_ids})},
            "sites": {"internal test split": values}, "deltas": {}}
    return {"spec": spec, "card": card}


def _pooling_spec(ctx) -> dict:
    """A slice-pooled child's model reads whole volumes: its pooling and the training volumes' slice count."""
    if not ctx.pooling:
        return {}
    first = next(i for i in ctx.codes if ctx.cache.has(i))
    return {"slice_pooling": ctx.pooling, "slices": int(ctx.cache.get(first).shape[-1])}


@contextmanager
def _quiet(logger_name: str):
    """Silence a logger's warnings for one call: MLflow warns about pickle on every save, and the choice is
    made and documented in log_model, so 36 repeats of it would only bury the ladder's own messages."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def register_best(tracker, results: pd.DataFrame, prefix: str, lineage: dict) -> dict[str, str]:
    """Per rung: the run with the best validation AUROC (any arm with a model, any protocol) -> a version of the
    registered model "<prefix>-<rung>", tagged with the lineage (pretraining run id, manifest digest) and the
    run's rung / seed / arm / protocol / labelled patients used. The ladder passes the children of ONE draw
    of each rung (repeat 0, first seed), whose validation AUROC is out-of-fold on that rung's own patients, so
    the choice spends no label outside the rung. Idempotent: a run already registered under that name is not
    registered again (resumed ladders). Returns {rung: version}."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracker.tracking_uri)
    registered = {}
    ok = results[(results["status"] == "ok") & results["run_id"].fillna("").astype(bool)]
    if "model_logged" in ok:  # only runs that logged a model can be registered
        ok = ok[ok["model_logged"].astype(str).str.lower() == "true"]
    for rung, part in ok.dropna(subset=["val_auroc"]).groupby("rung"):
        best = part.loc[part["val_auroc"].idxmax()]
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{prefix}-{rung}")
        try:
            known = {v.run_id: v.version for v in client.search_model_versions(f"name='{name}'")}
        except Exception:  # noqa: BLE001 — no such model yet, or a registry that cannot search
            known = {}
        if best["run_id"] in known:
            registered[rung] = known[best["run_id"]]
            continue
        arm = best.get("arm", best.get("init", ""))
        tags = {**lineage, "medssl.rung": rung, "medssl.seed": int(best["seed"]), "medssl.arm": arm,
                "medssl.init": arm, "medssl.protocol": best["protocol"], "medssl.val_auroc": f"{best['val_auroc']:.4f}",
                "medssl.test_auroc": f"{best['auroc']:.4f}", "medssl.validation": str(best.get("validation", "")),
                "medssl.positive_class": str(best.get("positive_class", "") or ""),
                "medssl.n_patients_used": str(best.get("n_patients_used", ""))}
        version = tracker.register_model("model", name, tags, run_id=best["run_id"])
        if version:
            registered[rung] = version
            console.print(f"registered [bold]{name}[/] v{version} ({best['key']}, val AUROC {best['val_auroc']:.3f})")
    return registered
