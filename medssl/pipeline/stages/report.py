"""Stage `report`: the label-efficiency curve, table and verdicts, on the parent
run (metrics, table, description): the reviewer's first stop."""
from __future__ import annotations

from medssl.pipeline.context import Context


def run_report(ctx: Context) -> dict:
    import pandas as pd
    from medssl.evaluate.report import build_report
    results = pd.read_csv(ctx.outputs["ladder"]["results"])
    artifacts = build_report(results, ctx.paths.report, tracker=ctx.tracker, run_id=ctx.parent_run_id)
    return {"paths": [str(p) for p in artifacts.values()], **{k: str(v) for k, v in artifacts.items()}}
