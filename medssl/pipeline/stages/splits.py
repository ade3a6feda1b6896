"""Stage `splits`: patient-level train/val/test splits and the label ladder's rungs."""
from __future__ import annotations

from medssl.errors import DataError
from medssl.pipeline.context import Context
from medssl.ui import console


def run_splits(ctx: Context) -> dict:
    from medssl.ingest.manifest import read_manifest
    from medssl.cohort import splits
    s = ctx.cfg.split
    df, meta = read_manifest(ctx.manifest_path)
    if s.label not in df.columns or df[s.label].isna().all():
        raise DataError(f"the manifest has no labels in column '{s.label}'", where=str(ctx.manifest_path),
                        fix="give data.labels (a labels CSV) or set split.label to a labelled column")
    df["split"] = splits.assign_splits(df, s.label, s.seed, s.val_fraction, s.test_fraction)
    # the splits go to their own file; the manifest (and so its digest) stays as the manifest stage wrote it
    rungs = splits.build_ladder(df, s.label, fractions=s.ladder.fractions, per_class=s.ladder.per_class,
                                seeds=s.ladder.seeds)
    made_for = {**s.model_dump(mode="json"), "manifest_digest": meta.get("digest")}  # read_data checks it
    splits.write_splits(ctx.splits_path, df, rungs, settings=made_for)
    counts = df["split"].value_counts().to_dict()
    console.print(f"splits: {counts}; {len(rungs)} ladder rungs")
    return {"paths": [str(ctx.splits_path)], "counts": counts, "rungs": len(rungs), "digest": meta.get("digest")}
