"""Stage `pretrain`: self-supervised pretraining on the training split and unlabelled patients."""
from __future__ import annotations

from medssl.pipeline.context import Context, open_cache, read_data


def _online_probe(ctx: Context, df, cache):
    """The "is it learning?" probe: labelled TRAINING images only (val/test stay unseen until evaluation)."""
    from medssl.cohort.splits import label_codes, labelled_ids
    from medssl.train.probe import make_probe
    if not ctx.cfg.pretrain.train.probe_every:
        return None
    ids = [i for i in labelled_ids(df, ctx.cfg.split.label, "train") if cache.has(i)]
    codes = label_codes(df, ctx.cfg.split.label).set_axis(df["image_id"])
    return make_probe(cache, ids, codes.loc[ids].astype(int).tolist(), ctx.cfg.pretrain.crop,
                      ctx.cfg.preprocess.spatial_dims, seed=ctx.cfg.pretrain.train.seed)


def run_pretrain(ctx: Context) -> dict:
    from medssl.cohort.splits import pretrain_ids
    from medssl.train.pretrain import run_pretraining
    df, meta = read_data(ctx)
    cache = open_cache(ctx, meta)
    # pretraining sees the training split and unlabelled patients, never val/test patients (no leakage)
    ids = [i for i in pretrain_ids(df) if cache.has(i)]
    contrastive = ctx.cfg.pretrain.ssl.contrastive
    by = "study_id" if contrastive is not None and contrastive.positives == "study" else "patient_id"
    groups = dict(zip(df["image_id"], df[by]))
    digest = meta.get("digest", "")
    with ctx.child("pretrain", **{"medssl.manifest_digest": digest}) as run:
        ctx.tracker.log_dataset(df[df["image_id"].isin(ids)], digest, ctx.cfg.name)  # what the encoder saw
        encoder = run_pretraining(ctx.cfg.pretrain, cache, ids, groups, ctx.paths.pretrain, ctx.tracker,
                                  probe=_online_probe(ctx, df, cache), spatial_dims=ctx.cfg.preprocess.spatial_dims,
                                  manifest_digest=digest, keep_checkpoints=ctx.cfg.pretrain.train.keep_checkpoints)
        run_id = run.info.run_id
    return {"paths": [str(encoder)], "encoder": str(encoder), "run_id": run_id, "images": len(ids)}
