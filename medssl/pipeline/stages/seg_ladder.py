"""Stages `ladder` and `report` when finetune.task is segmentation: masks cached through the image chain,
the Dice ladder (SSL vs scratch per rung and seed), its pooled table and label-efficiency curve."""
from __future__ import annotations

import shutil
from pathlib import Path

from medssl.errors import DataError
from medssl.ingest.csv_safe import write_csv
from medssl.pipeline import ranks
from medssl.pipeline.context import Context, open_cache, read_data
from medssl.train.distributed import wait_for_all
from medssl.ui import console


def _spacing(ctx: Context, df) -> dict:
    """mm per axis of each cached array: the preprocessing target, else the manifest's native spacing."""
    target = ctx.cfg.preprocess.spacing
    return {row.image_id: list(target) if target else [float(v) for v in str(row.spacing).split("x")]
            for row in df.itertuples()}


def run_seg_ladder(ctx: Context) -> dict:
    from medssl.cohort.splits import read_splits
    from medssl.evaluate.seg_report import pooled_summary, render_table, write_report
    from medssl.ladder.seg_ladder import RESULTS, run_seg_ladder as ladder
    from medssl.preprocess.masks import MaskCache
    df, meta = read_data(ctx)  # the manifest with its splits (from the splits file)
    if "mask" not in df.columns or not (df["mask"] != "").any():
        raise DataError("finetune.task is segmentation but the manifest has no usable mask", where=str(ctx.manifest_path),
                        fix="add a 'mask' column (label-map paths) to the labels CSV; see the problems column "
                            "for masks that were refused")
    if ctx.cfg.preprocess.slices_from_3d:
        raise DataError("segmentation on 2D slices of 3D volumes is not supported", where="preprocess.slices_from_3d",
                        fix="segment in 3D (spatial_dims: 3), or give 2D images with 2D masks")
    images = open_cache(ctx, meta)
    if ranks.rank() == 0:  # under torchrun: one process writes the mask cache, the others wait for it
        for image_id, reason in MaskCache(images).build(df, Path(meta["root"])).items():
            console.print(f"[yellow]mask not cached[/] {image_id}: {reason}")
    wait_for_all()
    masks = MaskCache(images)  # reads the index the build wrote
    pretrain = ctx.outputs["pretrain"]
    tags = {"medssl.pretrain_run_id": pretrain["run_id"], "medssl.manifest_digest": meta.get("digest", "")}
    with ctx.child("ladder", **tags):
        # repeat 0 only: the segmentation ladder scores the `split` column's test patients (split.repeats' other
        # repeats draw their rungs from patients that repeat 0 may test on)
        rungs = [r for r in read_splits(ctx.splits_path)["rungs"] if r.repeat == 0]
        results, scores = ladder(ctx.cfg.finetune, pretrain["encoder"], images, masks, df, rungs,
                                 _spacing(ctx, df), ctx.paths.ladder, ctx.tracker)
        if ranks.rank() != 0:  # rank 0 merged the ranks' runs and writes the summary (ranks.py)
            return {"paths": [], "rows": len(results)}
        if scores.empty:
            raise DataError("no segmentation run finished", where=str(ctx.paths.ladder / RESULTS),
                            fix="see the failures listed above")
        summary = pooled_summary(scores, ctx.cfg.finetune.bootstrap, ctx.cfg.finetune.seed)
        write_csv(scores, ctx.paths.ladder / "seg_scores.csv")
        artifacts = write_report(summary, ctx.paths.ladder)
        ctx.tracker.log_artifact(ctx.paths.ladder / RESULTS, "ladder")
    console.print(render_table(summary))
    return {"paths": [str(artifacts["table"])], "results": str(ctx.paths.ladder / RESULTS),
            "summary": str(artifacts["table"]), "curve": str(artifacts["curve"]), "rows": len(results)}


def run_seg_report(ctx: Context) -> dict:
    """The pooled table and Dice curve on the parent run (the reviewer's first stop)."""
    import pandas as pd
    out = ctx.paths.report
    out.mkdir(parents=True, exist_ok=True)
    for key in ("summary", "curve", "results"):
        shutil.copy(ctx.outputs["ladder"][key], out / Path(ctx.outputs["ladder"][key]).name)
    summary = pd.read_csv(ctx.outputs["ladder"]["summary"])
    for row in summary.itertuples():
        ctx.tracker.log_metrics({f"dice_{row.init}_{row.rung}": row.dice})
    ctx.tracker.log_artifacts(out, "report")
    return {"paths": [str(out / "dice_curve.png")], "curve": str(out / "dice_curve.png")}
