"""Stage `ladder`: fine-tune at each label budget, SSL vs the baselines."""
from __future__ import annotations

from medssl.pipeline.context import Context, open_cache, read_data


def run_ladder(ctx: Context) -> dict:
    from medssl.cohort.splits import read_splits
    from medssl.ladder.ladder import run_ladder as ladder
    df, meta = read_data(ctx)
    rungs = read_splits(ctx.splits_path)["rungs"]
    pretrain = ctx.outputs["pretrain"]
    tags = {"medssl.pretrain_run_id": pretrain["run_id"], "medssl.manifest_digest": meta.get("digest", "")}
    with ctx.child("ladder", **tags):
        label = ctx.cfg.split.label
        results = ladder(ctx.cfg.finetune, pretrain["encoder"], open_cache(ctx, meta), df, label, rungs,
                         ctx.paths.ladder, ctx.tracker, log_models=ctx.cfg.finetune.log_models,
                         monitor=ctx.cfg.finetune.monitor, class_names=meta.get("label_names", {}).get(label))
    out = ctx.paths.ladder / "results.csv"
    return {"paths": [str(out)], "results": str(out), "rows": len(results)}
