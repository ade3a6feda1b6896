"""Commands that use a pipeline's settings but are not stages: build a manifest, score an external
manifest, predict a folder."""
from __future__ import annotations

from pathlib import Path

from medssl.config import PipelineConfig
from medssl.pipeline.context import build_manifest_with_salt, open_external_cache, open_tracker
from medssl.ui import console
from medssl.ingest.csv_safe import write_csv


def print_manifest_summary(summary) -> None:
    console.print(summary.render() if hasattr(summary, "render") else str(summary))


def evaluate_external(cfg: PipelineConfig, model: str, manifest: Path, out: Path) -> dict:
    """Score a model on another manifest, preprocessed exactly as its pipeline's training data but in the
    site's own cache; labels matched to the training classes by name. Prints a table, writes the files."""
    import re
    from medssl.evaluate.external import class_names, training_codes
    from medssl.evaluate.predict import evaluate_model
    from medssl.evaluate.tables import evaluation_tables
    from medssl.ingest.manifest import read_manifest
    from medssl.pipeline.external_sites import site_dir
    from medssl.preprocess.cache import VolumeCache
    df, meta = read_manifest(manifest)
    site = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(manifest).stem)
    names = _training_names(cfg) or class_names(meta, df, cfg.split.label)
    codes = training_codes(df, meta, cfg.split.label, names, site)
    cache = VolumeCache(site_dir(cfg, site) / "cache", cfg.preprocess, meta["root"])  # never the training cache
    cache.build(df, workers=cfg.manifest.workers)
    values = evaluate_model(model, cache, df, cfg.split.label, out, open_tracker(cfg), n_boot=cfg.finetune.bootstrap,
                            codes=codes, class_names=names)
    for table in evaluation_tables(values, names):
        console.print(table)
    console.print(f"external validation on {manifest}\n  files: {out} (confusion matrix picture: "
                  f"{Path(out) / 'confusion.png'}, predictions.csv, metrics.json, roc.png, pr.png)")
    return values


def _training_names(cfg: PipelineConfig) -> dict[int, str]:
    """{code: class name} as the ladder's models were trained (results.csv class_names: a binary label is
    recoded so the positive class is code 1), else of the pipeline's training manifest, when it has been built."""
    import json
    from medssl.ingest.manifest import read_manifest
    from medssl.ladder.results import read_results
    results = read_results(Path(cfg.workdir) / cfg.name / "ladder" / "results.csv")
    coded = [c for c in results.get("class_names", []) if isinstance(c, str) and c]
    if coded:
        return dict(enumerate(json.loads(coded[0])))
    if not Path(cfg.manifest.out).is_file():
        return {}
    df, meta = read_manifest(cfg.manifest.out)
    from medssl.evaluate.external import class_names
    return class_names(meta, df, cfg.split.label)


def predict_folder(cfg: PipelineConfig, model: str, folder: Path, out: Path):
    """Index a folder of new scans, preprocess them like the training data, write one prediction per image."""
    from medssl.ingest.manifest import read_manifest
    from medssl.evaluate.predict import predict
    manifest_csv = Path(out).with_suffix(".manifest.csv")
    build_manifest_with_salt(folder, manifest_csv, cfg.manifest.salt_env, workdir=cfg.workdir,
                             workers=cfg.manifest.workers,
                             max_image_mb=cfg.manifest.max_image_mb, nifti_modality=cfg.data.nifti_modality)
    df, meta = read_manifest(manifest_csv)
    cache = open_external_cache(cfg, meta)
    cache.build(df, workers=cfg.manifest.workers)
    frame = predict(model, cache, df, Path(out), tracking_uri=open_tracker(cfg).tracking_uri)
    # the manifest holds only pseudonymous ids: add the files so users can find each prediction's scan
    frame = frame.merge(df[["image_id", "paths"]], on="image_id", how="left")
    write_csv(frame, out)  # file names may start with "=": neutralised for spreadsheets
    console.print(f"{len(frame)} predictions written to {out} (manifest of the folder: {manifest_csv})")
    return frame
