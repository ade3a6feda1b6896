"""Stage `ladder`: fine-tune at each label budget and split repeat, SSL vs scratch, features, random features."""
from __future__ import annotations

from medssl.pipeline.context import Context, open_cache, read_data


def run_ladder(ctx: Context) -> dict:
    from medssl.cohort.splits import read_splits
    from medssl.ladder.ladder import run_ladder as ladder
    df, meta = read_data(ctx)
    splits = read_splits(ctx.splits_path)
    pretrain = ctx.outputs["pretrain"]
    tags = {"medssl.pretrain_run_id": pretrain["run_id"], "medssl.manifest_digest": meta.get("digest", "")}
    with ctx.child("ladder", **tags):
        label = ctx.cfg.split.label
        results = ladder(ctx.cfg.finetune, pretrain["encoder"], open_cache(ctx, meta), df, label, splits["rungs"],
                         ctx.paths.ladder, ctx.tracker, log_models=ctx.cfg.finetune.log_models,
                         monitor=ctx.cfg.finetune.monitor, class_names=splits["classes"]["names"],
                         repeats=splits["repeats"], positive=splits["classes"]["positive"])
    out = ctx.paths.ladder / "results.csv"
    return {"paths": [str(out)], "results": str(out), "rows": len(results)}
