"""External sites of `evaluate.external`: each indexed (its own manifest, the pipeline's salt), preprocessed
exactly like the training data but in ITS OWN cache (workdir/NAME/external/SITE/cache, never the training
cache), then scored by every arm's kept models (evaluate.external)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from medssl.config import ExternalSiteConfig, PipelineConfig
from medssl.pipeline.context import build_manifest_with_salt
from medssl.ui import console


def site_dir(cfg: PipelineConfig, site: str) -> Path:
    return cfg.workdir / cfg.name / "external" / site


def prepare_site(cfg: PipelineConfig, site: ExternalSiteConfig):
    """(manifest rows, manifest meta, the site's VolumeCache) with every image preprocessed that can be."""
    from medssl.ingest.manifest import read_manifest
    from medssl.preprocess.cache import VolumeCache
    root = site_dir(cfg, site.name)
    manifest_csv = site.manifest or root / "manifest.csv"
    if site.folder is not None:
        m = cfg.manifest
        build_manifest_with_salt(site.folder, manifest_csv, m.salt_env, workdir=cfg.workdir, labels=site.labels,
                                 join_on=m.join_on,
                                 workers=m.workers, max_image_mb=m.max_image_mb, nifti_modality=cfg.data.nifti_modality)
    df, meta = read_manifest(manifest_csv)
    cache = VolumeCache(root / "cache", cfg.preprocess, meta["root"])  # same settings, separate folder
    for image_id, reason in cache.build(df, workers=cfg.manifest.workers).items():
        console.print(f"[yellow]{site.name}: not cached[/] {image_id}: {reason}")
    return df, meta, cache


def score_sites(cfg: PipelineConfig, results: pd.DataFrame, training_meta: dict, tracking_uri: str | None) -> dict:
    """{site name: rows like results.csv's, `predictions` = the site's prediction files} for the report."""
    from medssl.evaluate.external import score_site, training_codes
    label = cfg.split.label
    # the ladder's own coding first: it recodes a binary label so the positive class is code 1 (cohort/classes.py)
    names = _numeric_names(results) or (training_meta.get("label_names") or {}).get(label)
    scored = {}
    for site in cfg.evaluate.external:
        df, meta, cache = prepare_site(cfg, site)
        codes = training_codes(df, meta, label, names, site.name)
        scored[site.name] = score_site(site.name, results, cache, df, codes, site_dir(cfg, site.name) / "scores",
                                       tracking_uri, cfg.evaluate.batch_size)
    return scored


def _numeric_names(results: pd.DataFrame) -> dict[int, str]:
    """Training classes as the ladder coded them (its class_names column: binary positive class = code 1)."""
    import json
    if "class_names" in results and results["class_names"].notna().any():
        return dict(enumerate(json.loads(results["class_names"].dropna().iloc[0])))
    return {}
