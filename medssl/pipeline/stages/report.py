"""Stage `report`: external sites scored (evaluate.external), then the label-efficiency curve, table and
verdicts, internal and external side by side, on the parent run (metrics, table, description): the
reviewer's first stop."""
from __future__ import annotations

from medssl.pipeline.context import Context


def run_report(ctx: Context) -> dict:
    import pandas as pd
    from medssl.evaluate.report import build_report
    from medssl.ingest.manifest import read_manifest
    from medssl.pipeline.external_sites import score_sites
    results = pd.read_csv(ctx.outputs["ladder"]["results"])
    if "settings_digest" in results and len(results):  # rows of earlier settings are not this ladder's:
        results = results[results["settings_digest"] == results["settings_digest"].iloc[-1]]  # its rows come last
    external = {}
    if ctx.cfg.evaluate.external:
        _, meta = read_manifest(ctx.manifest_path)
        external = score_sites(ctx.cfg, results, meta, getattr(ctx.tracker, "tracking_uri", None))
    artifacts = build_report(results, ctx.paths.report, tracker=ctx.tracker, run_id=ctx.parent_run_id,
                             external=external)
    from medssl.ingest.csv_safe import read_csv
    from medssl.ladder.cards import refresh_model_cards
    refresh_model_cards(ctx.tracker, read_csv(artifacts["summary_csv"]))  # registered models get the evidence
    return {"paths": [str(p) for p in artifacts.values()], **{k: str(v) for k, v in artifacts.items()}}
