"""Stage `manifest`: scan the folder, assemble series, join labels; log the pseudonymous manifest."""
from __future__ import annotations

from pathlib import Path

from medssl.errors import DataError
from medssl.pipeline.context import Context, build_manifest_with_salt, data_source
from medssl.ui import console


def run_manifest(ctx: Context) -> dict:
    folder, labels = data_source(ctx)
    m = ctx.cfg.manifest
    with ctx.child("manifest"):
        summary = build_manifest_with_salt(folder, m.out, m.salt_env, workdir=ctx.cfg.workdir, labels=labels,
                                           join_on=m.join_on,
                                           workers=m.workers, max_image_mb=m.max_image_mb,
                                           nifti_modality=ctx.cfg.data.nifti_modality)
        console.print(summary.render() if hasattr(summary, "render") else str(summary))
        from medssl.ingest.manifest import read_manifest
        df, meta = read_manifest(m.out)
        if df.empty:
            raise DataError(f"no usable image was found in {folder}", where="data.folder",
                            fix=f"check the folder; every file that was seen is listed with its reason in "
                                f"{m.out.with_suffix('.skipped.csv')}")
        ctx.tracker.log_dataset(df, meta.get("digest"), ctx.cfg.name)
        ctx.tracker.log_metrics({"images": len(df), "skipped": _count_rows(m.out.with_suffix(".skipped.csv"))})
        from medssl.ingest.manifest_io import shared_paths
        for path in shared_paths(m.out):  # the identifier-free copies: no source paths, no absolute root
            ctx.tracker.log_artifact(path, "manifest")
    return {"paths": [str(m.out)], "images": len(df), "digest": meta.get("digest")}


def _count_rows(csv_path: Path) -> int:
    if not csv_path.is_file():
        return 0
    return max(0, sum(1 for _ in csv_path.open()) - 1)
