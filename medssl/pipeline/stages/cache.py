"""Stage `cache`: decode, orient, resample and normalise every image once."""
from __future__ import annotations

from medssl.errors import DataError
from medssl.pipeline.context import Context, open_cache
from medssl.ui import console


def run_cache(ctx: Context) -> dict:
    from medssl.ingest.manifest import read_manifest
    df, meta = read_manifest(ctx.manifest_path)
    cache = open_cache(ctx, meta)
    failures = cache.build(df, workers=ctx.cfg.manifest.workers)
    for image_id, reason in failures.items():
        console.print(f"[yellow]not cached[/] {image_id}: {reason}")
    if len(failures) == len(df):
        raise DataError("no image could be preprocessed", where=str(ctx.manifest_path),
                        fix="see the reasons above; check the preprocess settings")
    return {"paths": [str(cache.dir / "index.json")], "cached": len(df) - len(failures), "failed": failures}
