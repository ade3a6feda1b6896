"""Stage `demo`: build the embedded demo cohort from packaged real anatomy."""
from __future__ import annotations

from medssl.pipeline.context import Context


def run_demo(ctx: Context) -> dict:
    from medssl.demo.cohort import build_demo_cohort
    if ctx.cfg.data.demo.masks:   # the segmentation demo: lesion masks beside the images
        from medssl.demo.seg_cohort import build_seg_demo
        labels = build_seg_demo(ctx.cfg.data.demo, ctx.paths.demo_data, ctx.cfg.preprocess.spatial_dims)
        return {"folder": str(labels.parent / "images"), "labels": str(labels), "paths": [str(labels)]}
    cohort = build_demo_cohort(ctx.cfg.data.demo, ctx.paths.demo_data)
    return {"folder": str(cohort.folder), "labels": str(cohort.labels_csv), "paths": [str(cohort.labels_csv)]}
