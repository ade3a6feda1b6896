"""Stage `demo`: build the embedded demo cohort from packaged real anatomy."""
from __future__ import annotations

from medssl.pipeline.context import Context


def run_demo(ctx: Context) -> dict:
    from medssl.demo.cohort import build_demo_cohort
    cohort = build_demo_cohort(ctx.cfg.data.demo, ctx.paths.demo_data)
    return {"folder": str(cohort.folder), "labels": str(cohort.labels_csv), "paths": [str(cohort.labels_csv)]}
