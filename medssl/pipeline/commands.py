"""Commands that use a pipeline's settings but are not stages: build a manifest, score an external
manifest, predict a folder."""
from __future__ import annotations

from pathlib import Path

from medssl.config import PipelineConfig
from medssl.pipeline.context import build_manifest_with_salt, open_tracker
from medssl.ui import console


def print_manifest_summary(summary) -> None:
    console.print(summary.render() if hasattr(summary, "render") else str(summary))


def evaluate_external(cfg: PipelineConfig, model: str, manifest: Path, out: Path) -> dict:
    """Score a model on another manifest, preprocessed exactly as its pipeline's training data."""
    from medssl.preprocess.cache import VolumeCache
    from medssl.ingest.manifest import read_manifest
    from medssl.evaluate.predict import evaluate_model
    cache = VolumeCache(cfg.preprocess.cache_dir, cfg.preprocess)
    df, meta = read_manifest(manifest)
    cache.build(df, Path(meta["root"]), workers=cfg.manifest.workers)
    tracker = open_tracker(cfg)
    values = evaluate_model(model, cache, df, cfg.split.label, out, tracker, n_boot=cfg.finetune.bootstrap)
    shown = {k: round(v, 4) for k, v in values.items() if isinstance(v, float)}
    console.print(f"external validation on {manifest}: {shown}\n  files: {out}")
    return values


def predict_folder(cfg: PipelineConfig, model: str, folder: Path, out: Path):
    """Index a folder of new scans, preprocess them like the training data, write one prediction per image."""
    from medssl.preprocess.cache import VolumeCache
    from medssl.ingest.manifest import read_manifest
    from medssl.evaluate.predict import predict
    cache = VolumeCache(cfg.preprocess.cache_dir, cfg.preprocess)
    manifest_csv = Path(out).with_suffix(".manifest.csv")
    build_manifest_with_salt(folder, manifest_csv, cfg.manifest.salt_env, workers=cfg.manifest.workers,
                             max_image_mb=cfg.manifest.max_image_mb, nifti_modality=cfg.data.nifti_modality)
    df, meta = read_manifest(manifest_csv)
    cache.build(df, Path(meta["root"]), workers=cfg.manifest.workers)
    frame = predict(model, cache, df, Path(out), tracking_uri=open_tracker(cfg).tracking_uri)
    # the manifest holds only pseudonymous ids: add the files so users can find each prediction's scan
    frame = frame.merge(df[["image_id", "paths"]], on="image_id", how="left")
    frame.to_csv(out, index=False)
    console.print(f"{len(frame)} predictions written to {out} (manifest of the folder: {manifest_csv})")
    return frame
