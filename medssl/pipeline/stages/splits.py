"""Stage `splits`: patient-level train/val/test splits (one per repeat), the label ladder's rungs (counted in
patients) and the positive class."""
from __future__ import annotations

from medssl.errors import DataError
from medssl.pipeline.context import Context
from medssl.ui import console


def run_splits(ctx: Context) -> dict:
    from medssl.ingest.manifest import read_manifest
    from medssl.cohort import classes, splits
    s = ctx.cfg.split
    df, meta = read_manifest(ctx.manifest_path)
    if s.label not in df.columns or df[s.label].isna().all():
        raise DataError(f"the manifest has no labels in column '{s.label}'", where=str(ctx.manifest_path),
                        fix="give data.labels (a labels CSV) or set split.label to a labelled column")
    # under inner validation every choice is made inside the rung: a validation split would only waste patients
    val_fraction = s.val_fraction if ctx.cfg.finetune.validation == "split" else 0.0
    repeats = splits.assign_repeats(df, s.label, s.seed, val_fraction, s.test_fraction, s.repeats)
    # what pretraining may see (read_data puts it in the `split` column); the manifest stays as the manifest stage
    # wrote it, so its digest is the one every later stage and run records
    df["split"] = splits.manifest_split(repeats)
    rungs = [rung for r, split in enumerate(repeats)
             for rung in splits.build_ladder(df, s.label, fractions=s.ladder.fractions, per_class=s.ladder.per_class,
                                             seeds=s.ladder.seeds, split=split, repeat=r)]
    codes = splits.label_codes(df, s.label)
    names = classes.class_names(df, codes, meta.get("label_names", {}).get(s.label))
    positive = classes.positive_code(df, codes, names, s.positive_class)
    settings = {**s.model_dump(mode="json"), "val_fraction_used": val_fraction,
                "manifest_digest": meta.get("digest")}  # read_data checks it
    splits.write_splits(ctx.splits_path, df, rungs, settings=settings, repeats=repeats,
                        classes={"names": names, "positive": positive})
    counts = repeats[0].value_counts().to_dict()
    shown = f"; positive class: {names[positive]!r}" if positive is not None else ""
    console.print(f"splits: {counts} (repeat 0 of {s.repeats}); {len(rungs)} ladder rungs{shown}")
    return {"paths": [str(ctx.splits_path)], "counts": counts, "rungs": len(rungs), "digest": meta.get("digest"),
            "positive_class": names[positive] if positive is not None else ""}
