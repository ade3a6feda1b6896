"""One ladder child: (repeat, rung, seed, arm, protocol) trained on the rung's patients and scored on the test split.

Labels a child may use: the rung's (inner validation: training, epochs, C and threshold all from the rung's own
patients) plus, only under the opt-in `finetune.validation: split`, the repeat's validation split, which is then
counted in `n_extra_val_patients` and named in `labels_note`. The test split is only scored.
"""
from __future__ import annotations

import json
import re
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medssl.errors import MedsslError
from medssl.evaluate.metrics import classification_metrics
from medssl.evaluate.predict import score_dataset, write_evaluation
from medssl.ladder.classifier import FeatureSet, check_images, check_labels, class_weights, features, fit_rung
from medssl.models.engineered import dataset_features
from medssl.ladder.inner import fit_probe, patient_folds, proba, split_folds
from medssl.ladder.registry import log_model, model_description
from medssl.ladder.results import read_results, write_predictions
from medssl.ui import console


@dataclass(frozen=True)
class Child:
    rung: object          # cohort.splits.Rung (carries its repeat)
    arm: str              # ssl | scratch | features | random_features
    protocol: str         # linear | finetune

    @property
    def key(self) -> str:
        return f"r{self.rung.repeat}/{self.rung.name}/seed{self.rung.seed}/{self.arm}/{self.protocol}"


def child_dir(out_dir: Path, child: Child) -> Path:
    """out_dir/children/<key, runs of other characters as "__">: evaluation files and the training subset."""
    return Path(out_dir) / "children" / re.sub(r"[^A-Za-z0-9_.-]+", "__", child.key)


def safe_child(ctx, child: Child) -> dict:
    """One child; any failure becomes a 'failed' row (the error's first line) so the other rungs go on."""
    rung = child.rung
    base = {"key": child.key, "settings_digest": ctx.digest, "repeat": rung.repeat, "rung": rung.name,
            "seed": rung.seed, "arm": child.arm, "protocol": child.protocol, "init": child.arm,
            "validation": ctx.cfg.validation, "n_labelled": len(rung.image_ids)}
    try:
        return {**base, **_run_child(ctx, child), "status": "ok", "error": ""}
    except Exception as err:  # noqa: BLE001 — recorded and reported; KeyboardInterrupt still stops
        console.print(f"[red]failed[/] {base['key']}: {err}")
        if not isinstance(err, MedsslError):  # a bug or a library error: the trace helps whoever reports it
            console.print(traceback.format_exc(limit=-3), style="dim")
        return {**base, "status": "failed", "error": str(err).splitlines()[0][:300]}


def budget(ctx, child: Child) -> dict:
    """The labelled images a child may use: rung (training), extra validation (split mode only), test."""
    r = child.rung.repeat
    train = [i for i in child.rung.image_ids if ctx.cache.has(i)]
    val = ctx.ids(r, "val") if ctx.cfg.validation == "split" else []
    return {"train": train, "val": val, "test": ctx.ids(r, "test")}


def _run_child(ctx, child: Child) -> dict:
    cfg, rung, seed = ctx.cfg, child.rung, ctx.cfg.seed + child.rung.seed
    ids = budget(ctx, child)
    y = {part: [ctx.codes[i] for i in part_ids] for part, part_ids in ids.items()}
    names = dict(enumerate(ctx.class_names))
    check_labels({"training subset": y["train"], "test split": y["test"],
                  **({"validation split": y["val"]} if ctx.cfg.validation == "split" else {})},
                 ctx.n_classes, rung.name, names)
    folds = (patient_folds([ctx.patients[i] for i in ids["train"]], y["train"], cfg.inner_folds, seed, rung.name, names)
             if cfg.validation == "inner" else split_folds(len(ids["train"]), len(ids["val"])))
    items = ids["train"] + ids["val"]
    test_ds = ctx.dataset(ids["test"])
    folder = child_dir(ctx.out_dir, child)
    with ctx.tracker.run(f"r{rung.repeat} {rung.name} seed{rung.seed} {child.arm} {child.protocol}",
                         parent_run_id=ctx.parent_run_id, tags=_tags(ctx, child)) as run:
        ctx.tracker.log_params(_params(ctx, child, ids, y["train"]))
        if child.arm == "features":
            fitted = _fit_features(ctx, items, folds, seed)
            test_ids, probs = ids["test"], proba(fitted["probe"].model, engineered_features(ctx, ids["test"]),
                                            ctx.n_classes)
        else:
            fitted = _fit_deep(ctx, child, items, folds, seed)
            test_ids, probs = score_dataset(fitted["result"].model, test_ds, cfg.batch_size)
        y_test, groups = np.array([ctx.codes[i] for i in test_ids]), [ctx.patients[i] for i in test_ids]
        values = classification_metrics(y_test, probs, fitted["threshold"], groups, cfg.bootstrap, seed)
        counts = _counts(ctx, child, ids, y_test)
        paths = write_evaluation(folder, test_ids, y_test, probs, values, fitted["threshold"], groups)
        write_predictions(folder / "predictions.csv", test_ids, y_test, groups, probs, fitted["threshold"])
        kept = _keep_model(ctx, child, fitted, values, test_ids, folder)
        paths.append(_write_subset(folder, ids["train"]))
        logged = _log_child(ctx, child, fitted, values, paths, test_ids, counts["n_patients_used"])
        run_id = run.info.run_id
    return {"run_id": run_id or "", "model_logged": logged, "predictions": str(folder / "predictions.csv"),
            "model": kept,
            "bootstrap_seed": seed, "bootstrap_n": cfg.bootstrap, **counts,
            "inner_folds": cfg.inner_folds if cfg.validation == "inner" else 0,
            "chosen_epochs": fitted["epochs"], "chosen_C": fitted["C"], "threshold": fitted["threshold"],
            "val_auroc": fitted["val_auroc"], "val_loss": fitted["val_loss"], "epochs_trained": fitted["epochs"],
            **values}


def _fit_deep(ctx, child: Child, items: list[str], folds, seed: int) -> dict:
    encoder = ctx.encoder(child.arm, seed)
    data = ctx.dataset(items)
    check_images(encoder, data[0]["image"], ctx.input_dims, ctx.encoder_cfg.in_channels, f"rung {child.rung.name}")
    if child.protocol == "linear":  # frozen encoder: its features are computed once per ladder, not per run
        data = _cached_features(ctx, encoder, child.arm, seed, items)
    result = fit_rung(encoder, data, folds, ctx.n_classes, child.protocol, ctx.cfg, seed, ctx.monitor,
                      spatial_dims=ctx.input_dims)  # what prediction feeds the Classifier: slices or volumes
    epochs = result.epochs if child.protocol == "finetune" else float("nan")
    return {"result": result, "threshold": result.threshold, "epochs": epochs, "C": result.chosen_C,
            "val_auroc": result.val_auroc, "val_loss": result.val_loss, "history": result.history}


def _fit_features(ctx, items: list[str], folds, seed: int) -> dict:
    y = np.array([ctx.codes[i] for i in items])
    refit = folds.refit if folds.refit is not None else folds.splits[0][0]
    weights = class_weights(y[refit], ctx.n_classes, ctx.cfg.imbalance).numpy()
    probe = fit_probe(engineered_features(ctx, items), y, folds, ctx.n_classes, ctx.cfg.imbalance != "none", ctx.monitor,
                      seed, weights, ctx.cfg.target_sensitivity)
    return {"probe": probe, "threshold": probe.threshold, "epochs": float("nan"), "C": probe.C,
            "val_auroc": probe.val_auroc, "val_loss": probe.val_loss, "history": probe.history}


def _cached_features(ctx, encoder, arm: str, seed: int, ids: list[str]) -> FeatureSet:
    """Frozen-encoder features by image id. The SSL encoder is the same for every run; a random one is fixed by
    its seed, so (arm, seed) names one encoder."""
    store = ctx.features.setdefault("ssl" if arm == "ssl" else f"random-{seed}", {})
    missing = [i for i in ids if i not in store]
    if missing:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        computed = features(encoder.to(device), ctx.dataset(missing), ctx.cfg.batch_size)
        store.update(zip(missing, computed.feats))
    return FeatureSet(torch.stack([store[i] for i in ids]), [ctx.codes[i] for i in ids], ids)  # (N, F)


def engineered_features(ctx, ids: list[str]) -> np.ndarray:
    """(N, F) engineered features (models/engineered.py), computed once per image per ladder."""
    store = ctx.features.setdefault("engineered", {})
    missing = [i for i in ids if i not in store]
    if missing:
        store.update(zip(missing, dataset_features(ctx.dataset(missing))[0]))
    return np.stack([store[i] for i in ids])


def _counts(ctx, child: Child, ids: dict, y_test) -> dict:
    """Every labelled patient behind the child's numbers, outside the test split."""
    rung_patients = {ctx.patients[i] for i in ids["train"]}
    extra = {ctx.patients[i] for i in ids["val"]}
    per_class = {ctx.class_names[c]: n for c, n in sorted(child.rung.counts.items())} if child.rung.counts else {}
    return {"n_labelled": len(ids["train"]), "n_labelled_patients": len(rung_patients),
            "n_extra_val_patients": len(extra), "n_patients_used": len(rung_patients | extra),
            "labels_note": f"uses {len(extra)} extra validation labels" if extra else "",
            "rung_class_patients": json.dumps(per_class), "class_names": json.dumps(ctx.class_names),
            "positive_class": ctx.positive, "n_test_images": len(y_test),
            "n_test_patients": len({ctx.patients[i] for i in ids["test"]})}


def _tags(ctx, child: Child) -> dict:
    rung = child.rung
    return {"medssl.stage": "finetune", **ctx.lineage(), "medssl.rung": rung.name, "medssl.seed": rung.seed,
            "medssl.repeat": rung.repeat, "medssl.arm": child.arm, "medssl.init": child.arm,
            "medssl.protocol": child.protocol, "medssl.validation": ctx.cfg.validation,
            "medssl.positive_class": ctx.positive,
            **({"medssl.rank": ctx.rank} if ctx.parallel else {})}  # the worker / torchrun rank that ran it


def _params(ctx, child: Child, ids: dict, y_train) -> dict:
    counts = np.bincount(np.asarray(y_train, int), minlength=ctx.n_classes)
    used = _counts(ctx, child, ids, ids["test"])
    return {"rung": child.rung.name, "seed": child.rung.seed, "repeat": child.rung.repeat, "arm": child.arm,
            "protocol": child.protocol, "init": child.arm, "validation": ctx.cfg.validation,
            "n_labelled": len(y_train), "n_labelled_patients": used["n_labelled_patients"],
            "n_patients_used": used["n_patients_used"], "labels_note": used["labels_note"] or "rung labels only",
            "n_val": len(ids["val"]), "n_test": len(ids["test"]), "train_class_counts": counts.tolist(),
            "n_classes": ctx.n_classes, "class_names": ctx.class_names, "positive_class": ctx.positive,
            "spatial_dims": ctx.spatial_dims, "slice_pooling": ctx.pooling or "none", "img_size": ctx.img_size,
            "encoder": ctx.encoder_cfg.model_dump(),
            "finetune": ctx.cfg.model_dump(), "monitor": ctx.monitor}


def _write_subset(folder: Path, train_ids: list[str]) -> Path:
    path = folder / "train_subset_ids.txt"
    path.write_text("\n".join(train_ids) + "\n")
    return path


def _log_child(ctx, child: Child, fitted: dict, values: dict, paths: list[Path], test_ids, n_used: int) -> bool:
    """Metrics, evaluation files and (per `log_models`) the model; True when the model was logged."""
    tracker = ctx.tracker
    for row in fitted["history"]:
        tracker.log_metrics({k: row[k] for k in ("val_loss", "val_auroc") if np.isfinite(row[k])}, step=row["epoch"])
    used = {k: v for k, v in values.items() if np.isfinite(v)}
    tracker.log_metrics({**{f"test_{k}": v for k, v in used.items()},
                         **{k: fitted[v] for k, v in (("best_val_auroc", "val_auroc"), ("best_val_loss", "val_loss"))
                            if np.isfinite(fitted[v])},
                         "n_patients_used": float(n_used),
                         **({"threshold": fitted["threshold"]} if np.isfinite(fitted["threshold"]) else {})})
    for path in paths:
        tracker.log_artifact(path, "evaluation" if path.suffix != ".txt" else "subset")
    if "result" not in fitted or ctx.log_models == "none" or not getattr(tracker, "experiment", None):
        return False
    if ctx.log_models == "best" and not _beats_logged(ctx, child, fitted["val_auroc"]):
        return False
    log_model(tracker, fitted["result"].model, model_description(ctx, child, values, test_ids))
    return True


def _beats_logged(ctx, child: Child, val_auroc: float) -> bool:
    """"best": only registrable children (repeat 0, first seed) log, and only when their inner validation AUROC
    beats every logged run of the same rung read back from this process's results."""
    if child.rung.repeat != 0 or child.rung.seed != ctx.first_seed:
        return False
    done = pd.concat([read_results(path) for path in ctx.result_files()], ignore_index=True)
    if "model_logged" not in done or not len(done):
        return True
    logged = done["model_logged"].astype(str).str.lower() == "true"
    mine = done[(done["status"] == "ok") & (done["rung"] == child.rung.name) & logged
                & (done["repeat"] == 0) & (done["seed"] == ctx.first_seed)]
    return not len(mine) or val_auroc > float(mine["val_auroc"].max())


def _keep_model(ctx, child: Child, fitted: dict, values: dict, test_ids, folder: Path) -> str:
    """Every child's model as a local medssl package beside its predictions (safetensors + JSON), so external
    sites can score every run, not only those logged to MLflow. The features arm's is its probe on the
    engineered features (models/features_model.py): it scores images as the child's own test predictions did."""
    from medssl.export.package import save_package
    from medssl.models.features_model import from_probe
    spec = model_description(ctx, child, values, test_ids)["spec"]
    if child.arm == "features":
        probe = fitted["probe"].model
        model = from_probe(probe, ctx.n_classes, probe[0].n_features_in_, fitted["threshold"], ctx.input_dims)
    else:
        model = fitted["result"].model
    return str(save_package(folder / "model", model, spec))
