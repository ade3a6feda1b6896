"""The registered segmentation model per rung: the logged run with the lowest final training loss on the rung's
own volumes (no test or validation label picks it), tagged with its lineage."""
from __future__ import annotations

import re

import pandas as pd

from medssl.ui import console


def seg_lineage(ctx) -> dict:
    return {"medssl.pretrain_run_id": ctx.info.get("pretrain_run_id") or "",
            "medssl.manifest_digest": ctx.info.get("manifest_digest") or "", "medssl.encoder_source": ctx.encoder_source}


def register_best(ctx, results: pd.DataFrame, prefix: str) -> dict[str, str]:
    """Per rung: the logged run with the lowest final training loss (the rung's own volumes; no test or
    validation label picks it) -> a version of "<prefix>-<rung>" tagged with its lineage."""
    from mlflow.tracking import MlflowClient
    client, registered = MlflowClient(ctx.tracker.tracking_uri), {}
    ok = results[(results["status"] == "ok") & results["run_id"].fillna("").astype(bool)]
    ok = ok[ok["model_logged"].astype(str).str.lower() == "true"]
    for rung, part in ok.groupby("rung"):
        best = part.loc[part["final_train_loss"].idxmin()]
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{prefix}-{rung}")
        try:   # a resumed ladder does not register the same run twice
            known = {v.run_id: v.version for v in client.search_model_versions(f"name='{name}'")}
        except Exception:  # noqa: BLE001 — no such model yet
            known = {}
        if best["run_id"] in known:
            registered[rung] = known[best["run_id"]]
            continue
        tags = {**seg_lineage(ctx), "medssl.task": "segmentation", "medssl.rung": rung, "medssl.seed": int(best["seed"]),
                "medssl.init": best["init"], "medssl.test_dice": f"{best['dice']:.4f}"}
        version = ctx.tracker.register_model("model", name, tags, run_id=best["run_id"])
        if version:
            registered[rung] = version
            console.print(f"registered [bold]{name}[/] v{version} ({best['key']}, test Dice {best['dice']:.3f})")
    return registered
