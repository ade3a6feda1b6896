"""The label ladder: every (rung, seed) x protocol, SSL-initialised and from scratch, as MLflow child runs.

For each rung (a labelled training subset for one seed) and protocol the scratch run goes first, then the
SSL run on the SAME subset, seed, epochs and validation/test images; the SSL row carries the paired
SSL - scratch difference (paired patient bootstrap on the same test images). In the linear protocol
"scratch" is a FROZEN randomly initialised encoder (a random-features baseline, not a trained network).

`out_dir/results.csv` gets one row per finished child, appended (and flushed) the moment it finishes, so an
interrupted ladder resumes where it stopped: children with status "ok" are never redone, failed ones are
tried again. A failing child is recorded with its error and the ladder goes on with the others.
"""
from __future__ import annotations

import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medssl.config import EncoderConfig, FinetuneConfig
from medssl.errors import ConfigError, DataError, MedsslError
from medssl.evaluate.bootstrap import paired_bootstrap
from medssl.evaluate.metrics import classification_metrics, multiclass_metrics, positive_scores, resample_metrics
from medssl.ladder.classifier import FeatureSet, check_images, check_labels, features, fit
from medssl.evaluate.predict import score_dataset, write_evaluation
from medssl.ladder.registry import log_model, model_description, register_best
from medssl.ladder.results import print_failures, append_result, finished_keys, read_results, settings_digest
from medssl.ui import console, progress_bar

INITS = ("scratch", "ssl")  # scratch first: the SSL row then carries the paired difference
RESULTS = "results.csv"
LOG_MODELS = ("all", "best", "none")
PAIRED = ("auroc", "auprc")  # threshold-free, so the two models' own thresholds do not blur the difference


@dataclass
class LadderContext:
    """What every child of one ladder shares."""
    cfg: FinetuneConfig
    encoder_source: str
    info: dict
    encoder_cfg: EncoderConfig
    spatial_dims: int
    img_size: list[int]
    cache: object
    codes: dict
    patients: dict
    val_ids: list[str]
    test_ids: list[str]
    n_classes: int
    out_dir: Path
    tracker: object
    log_models: str
    class_names: dict
    monitor: str
    digest: str = ""  # settings + encoder identity: results made under other settings are not "finished"
    features: dict = field(default_factory=dict)  # frozen-encoder features: {"ssl" | "scratch-<seed>": {id: (F,)}}
    data: dict = field(default_factory=dict)  # what the model package records: label, modalities, image dims


def run_ladder(cfg: FinetuneConfig, encoder_source, cache, df: pd.DataFrame, label: str, rungs, out_dir,
               tracker, encoder_cfg: EncoderConfig | None = None, spatial_dims: int | None = None,
               img_size: list[int] | None = None, *, log_models: bool | str = "best", class_names: dict | None = None,
               monitor: str = "val_loss", registered_model_prefix: str | None = None) -> pd.DataFrame:
    """Run (or resume) the ladder; returns one row per (rung, seed, protocol, init), failures included.

    log_models: "best" (default: a run logs its model only when its validation AUROC beats every earlier
    run of the same rung name, so every model that can end up registered is logged, typically ~3 per rung
    instead of one per run: the demo's 3D ResNet-10 is 57 MB a model, 36 runs = 2 GB), "all" (True: every
    run logs its model) or "none" (False: tests, dry runs). The registry gets the best logged model per rung.
    """
    log_models = {True: "all", False: "none"}.get(log_models, log_models)
    if log_models not in LOG_MODELS:
        raise ConfigError(f"log_models must be one of {LOG_MODELS}, got {log_models!r}", where="finetune.log_models")
    ctx = _context(cfg, encoder_source, cache, df, label, out_dir, tracker, encoder_cfg, spatial_dims,
                   img_size, log_models, class_names or {}, monitor)
    results_csv = ctx.out_dir / RESULTS
    done = finished_keys(results_csv, ctx.digest)
    plan = [(rung, protocol, init) for rung in rungs for protocol in cfg.protocols for init in INITS]
    with progress_bar("runs") as progress:
        task = progress.add_task("ladder", total=len(plan))
        for rung, protocol, init in plan:
            key = child_key(rung, protocol, init)
            if key not in done:
                progress.update(task, description=f"ladder {key}")
                append_result(results_csv, _safe_child(ctx, rung, protocol, init))
            progress.advance(task)
    results = read_results(results_csv)
    if "settings_digest" in results:  # rows of earlier settings stay in the file but are not this ladder's
        results = results[results["settings_digest"].astype(str) == ctx.digest].reset_index(drop=True)
    print_failures(results)
    if cfg.register_model and log_models != "none" and getattr(tracker, "experiment", None):
        register_best(tracker, results, registered_model_prefix or f"{tracker.experiment}-{label}", _lineage(ctx))
    if getattr(tracker, "active_run_id", None):  # the ladder's own run, when the caller opened one
        failed = int((results["status"] != "ok").sum())
        tracker.log_metrics({"children_ok": len(results) - failed, "children_failed": failed})
        tracker.log_artifact(results_csv, "ladder")
    return results


def _context(cfg, encoder_source, cache, df, label, out_dir, tracker, encoder_cfg, spatial_dims, img_size,
             log_models, class_names, monitor) -> LadderContext:
    from medssl.cohort.splits import label_codes, labelled_ids
    from medssl.models.encoders import load_encoder
    _, info = load_encoder(encoder_source)  # fails early on a missing or broken encoder file
    codes = label_codes(df, label)
    labelled = codes.notna()
    code_of = dict(zip(df.loc[labelled, "image_id"], codes[labelled].astype(int)))
    if not code_of:  # nothing any rung could train on: one clear error instead of one per run
        raise DataError(f"the manifest has no labels in column '{label}'", where="split.label",
                        fix="give data.labels (a labels CSV) or choose a labelled column")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = LadderContext(
        cfg=cfg, encoder_source=str(encoder_source), info=info,
        encoder_cfg=encoder_cfg or EncoderConfig.model_validate(info["encoder"]),
        spatial_dims=spatial_dims or int(info["spatial_dims"]), img_size=list(img_size or info["img_size"]),
        cache=cache, codes=code_of, patients=dict(zip(df["image_id"], df["patient_id"])),
        val_ids=[i for i in labelled_ids(df, label, "val") if cache.has(i)],
        test_ids=[i for i in labelled_ids(df, label, "test") if cache.has(i)],
        n_classes=int(max(code_of.values(), default=0)) + 1, out_dir=out_dir, tracker=tracker,
        log_models=log_models, class_names={int(k): v for k, v in class_names.items()}, monitor=monitor)
    ctx.digest = settings_digest(_settings(ctx, label), ctx.encoder_source)
    column = lambda name: df[name].dropna().unique() if name in df else []  # noqa: E731
    ctx.data = {"label": label, "modalities": sorted(map(str, column("modality"))),
                "image_dims": sorted(int(d) for d in column("spatial_dims"))}
    return ctx


def _settings(ctx: LadderContext, label: str) -> dict:
    """What a finished run depends on (see results.settings_digest)."""
    return {"finetune": ctx.cfg.model_dump(mode="json", exclude={"register_model"}),
            "encoder_cfg": ctx.encoder_cfg.model_dump(mode="json"), "spatial_dims": ctx.spatial_dims,
            "img_size": ctx.img_size, "label": label, "monitor": ctx.monitor,
            "val": sorted(ctx.val_ids), "test": sorted(ctx.test_ids)}


# ------------------------------------------------------------------------------------------ one child
def child_key(rung, protocol: str, init: str) -> str:
    return f"{rung.name}/seed{rung.seed}/{protocol}/{init}"


def child_dir(out_dir: Path, rung, protocol: str, init: str) -> Path:
    """out_dir/children/<rung>__seed<k>__<protocol>__<init>: evaluation files and the training subset."""
    return out_dir / "children" / re.sub(r"[^A-Za-z0-9_.-]+", "__", child_key(rung, protocol, init))


def _safe_child(ctx: LadderContext, rung, protocol: str, init: str) -> dict:
    """One child; any failure becomes a 'failed' row (the error's first line) so the other rungs go on."""
    base = {"key": child_key(rung, protocol, init), "settings_digest": ctx.digest, "rung": rung.name, "seed": rung.seed, "protocol": protocol,
            "init": init, "n_labelled": len(rung.image_ids)}
    try:
        return {**base, **_run_child(ctx, rung, protocol, init), "status": "ok", "error": ""}
    except Exception as err:  # noqa: BLE001 — recorded and reported; KeyboardInterrupt still stops
        console.print(f"[red]failed[/] {base['key']}: {err}")
        if not isinstance(err, MedsslError):  # a bug or a library error: the trace helps whoever reports it
            console.print(traceback.format_exc(limit=-3), style="dim")
        return {**base, "status": "failed", "error": str(err).splitlines()[0][:300]}


def _run_child(ctx: LadderContext, rung, protocol: str, init: str) -> dict:
    cfg, seed = ctx.cfg, ctx.cfg.seed + rung.seed
    train_ids = [i for i in rung.image_ids if ctx.cache.has(i)]
    y_train = [ctx.codes[i] for i in train_ids]
    check_labels({"training subset": y_train, "validation split": [ctx.codes[i] for i in ctx.val_ids],
                  "test split": [ctx.codes[i] for i in ctx.test_ids]}, ctx.n_classes, rung.name, ctx.class_names)
    encoder = _encoder(ctx, init, seed)
    train_ds, val_ds, test_ds = (_dataset(ctx, ids) for ids in (train_ids, ctx.val_ids, ctx.test_ids))
    sample = train_ds[0]["image"]
    check_images(encoder, sample, ctx.spatial_dims, ctx.encoder_cfg.in_channels, f"rung {rung.name}")
    folder = child_dir(ctx.out_dir, rung, protocol, init)
    name = f"{rung.name} seed{rung.seed} {protocol} {init}"
    with ctx.tracker.run(name, tags=_tags(ctx, rung, protocol, init)) as run:
        ctx.tracker.log_params(_params(ctx, rung, protocol, init, y_train))
        if protocol == "linear":  # frozen encoder: its features are computed once per ladder, not per run
            train_ds, val_ds = (_cached_features(ctx, encoder, init, seed, ids) for ids in (train_ids, ctx.val_ids))
        result = fit(encoder, train_ds, val_ds, ctx.n_classes, protocol, cfg, seed, ctx.monitor,
                     spatial_dims=ctx.spatial_dims)
        ids, probs = score_dataset(result.model, test_ds, cfg.batch_size)
        y, groups = np.array([ctx.codes[i] for i in ids]), [ctx.patients[i] for i in ids]
        values = classification_metrics(y, probs, result.threshold, groups, cfg.bootstrap, seed)
        paths = write_evaluation(folder, ids, y, probs, values, result.threshold, groups)
        paths.append(_write_subset(folder, train_ids))
        delta = _paired_delta(ctx, rung, protocol, ids, y, probs, seed) if init == "ssl" else {}
        logged = _log_child(ctx, rung, result, values, delta, paths, sample)
        run_id = run.info.run_id
    # n_labelled: the images actually used (a rung image that failed preprocessing is not in the cache)
    return {"run_id": run_id or "", "n_labelled": len(train_ids), "model_logged": logged,
            "predictions": str(folder / "predictions.csv"), "bootstrap_seed": seed, "bootstrap_n": cfg.bootstrap,
            "val_auroc": result.val_auroc, "val_loss": result.val_loss, "epochs_trained": result.epochs,
            **values, **delta}


def _encoder(ctx: LadderContext, init: str, seed: int):
    from medssl.models.encoders import build_encoder, load_encoder
    if init == "ssl":
        return load_encoder(ctx.encoder_source)[0]
    torch.manual_seed(seed)  # the random initialisation is part of the seed
    return build_encoder(ctx.encoder_cfg, ctx.spatial_dims, ctx.img_size)


def _dataset(ctx: LadderContext, ids: list[str]):
    from medssl.train.loaders import ImageDataset
    # spatial_dims: a 2D encoder on 3D cached volumes sees their central axial slice (the loader's rule)
    return ImageDataset(ctx.cache, ids, [ctx.codes[i] for i in ids], spatial_dims=ctx.spatial_dims)


def _cached_features(ctx: LadderContext, encoder, init: str, seed: int, ids: list[str]) -> FeatureSet:
    """Frozen-encoder features by image id. The SSL encoder is the same for every run; a scratch encoder
    is fixed by its seed, so (init, seed) names one encoder."""
    store = ctx.features.setdefault("ssl" if init == "ssl" else f"scratch-{seed}", {})
    missing = [i for i in ids if i not in store]
    if missing:
        computed = features(encoder.to(_device()), _dataset(ctx, missing), ctx.cfg.batch_size)
        store.update(zip(missing, computed.feats))
    return FeatureSet(torch.stack([store[i] for i in ids]), [ctx.codes[i] for i in ids], ids)  # (N, F)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _lineage(ctx: LadderContext) -> dict:
    return {"medssl.pretrain_run_id": ctx.info.get("pretrain_run_id") or "",
            "medssl.manifest_digest": ctx.info.get("manifest_digest") or "",
            "medssl.encoder_source": ctx.encoder_source}


def _tags(ctx: LadderContext, rung, protocol: str, init: str) -> dict:
    return {"medssl.stage": "finetune", **_lineage(ctx), "medssl.rung": rung.name, "medssl.seed": rung.seed,
            "medssl.init": init, "medssl.protocol": protocol}


def _params(ctx: LadderContext, rung, protocol: str, init: str, y_train) -> dict:
    counts = np.bincount(np.asarray(y_train, int), minlength=ctx.n_classes)
    return {"rung": rung.name, "seed": rung.seed, "protocol": protocol, "init": init,
            "n_labelled": len(y_train), "n_val": len(ctx.val_ids), "n_test": len(ctx.test_ids),
            "train_class_counts": counts.tolist(), "n_classes": ctx.n_classes, "spatial_dims": ctx.spatial_dims,
            "img_size": ctx.img_size, "encoder": ctx.encoder_cfg.model_dump(), "finetune": ctx.cfg.model_dump(),
            "monitor": ctx.monitor}


def _write_subset(folder: Path, train_ids: list[str]) -> Path:
    path = folder / "train_subset_ids.txt"
    path.write_text("\n".join(train_ids) + "\n")
    return path


def _paired_delta(ctx, rung, protocol: str, ids, y, probs, seed: int) -> dict:
    """SSL - scratch on the same test images and patient resamples (scratch predictions read back)."""
    scratch_csv = child_dir(ctx.out_dir, rung, protocol, "scratch") / "predictions.csv"
    if not scratch_csv.is_file():
        return {}  # the scratch child failed: no pair to compare with
    scratch = pd.read_csv(scratch_csv).set_index("image_id").loc[list(ids)]
    cols = ["score"] if "score" in scratch else [f"score_{k}" for k in range(ctx.n_classes)]
    other = scratch[cols].to_numpy().squeeze(axis=1) if cols == ["score"] else scratch[cols].to_numpy()
    fn = (lambda a, s: resample_metrics(a, s, 0.5)) if other.ndim == 1 else multiclass_metrics
    names = PAIRED if other.ndim == 1 else ("auroc",)
    out, skipped = paired_bootstrap(fn, y, positive_scores(probs), other, [ctx.patients[i] for i in ids],
                                    ctx.cfg.bootstrap, seed, names=names)
    delta = {}
    for name, (diff, low, high) in out.items():
        delta.update({f"delta_{name}": diff, f"delta_{name}_ci_low": low, f"delta_{name}_ci_high": high})
    return {**delta, "delta_boot_skipped": float(skipped)}


def _log_child(ctx: LadderContext, rung, result, values: dict, delta: dict, paths: list[Path], sample) -> bool:
    """Metrics, evaluation files and (per `log_models`) the model; True when the model was logged."""
    tracker = ctx.tracker
    for row in result.history:
        tracker.log_metrics({"val_loss": row["val_loss"], "val_auroc": row["val_auroc"]}, step=row["epoch"])
    tracker.log_metrics({**{f"test_{k}": v for k, v in values.items() if np.isfinite(v)},
                         **{k: v for k, v in delta.items() if np.isfinite(v)},
                         "best_val_auroc": result.val_auroc, "best_val_loss": result.val_loss,
                         "epochs_trained": result.epochs})
    for path in paths:
        tracker.log_artifact(path, "evaluation" if path.suffix != ".txt" else "subset")
    if ctx.log_models == "none" or not getattr(tracker, "experiment", None):
        return False
    if ctx.log_models == "best" and result.val_auroc <= _best_so_far(ctx, rung.name):
        return False
    log_model(tracker, result.model, model_description(ctx, rung, values, delta))
    return True


def _best_so_far(ctx: LadderContext, rung_name: str) -> float:
    """Best validation AUROC among finished runs of this rung name whose model was logged (-inf if none)."""
    done = read_results(ctx.out_dir / RESULTS)
    if "model_logged" not in done:
        return float("-inf")
    logged = done["model_logged"].astype(str).str.lower() == "true"
    mine = done[(done["status"] == "ok") & (done["rung"] == rung_name) & logged]
    return float(mine["val_auroc"].max()) if len(mine) else float("-inf")
