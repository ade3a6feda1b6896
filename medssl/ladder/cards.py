"""Model cards completed by the report: a registered model's card is first written when the ladder logs it
(its own run's internal numbers); once the report has pooled every run, scored the external sites and made
the paired comparisons, the card of each registered version is rewritten with the rung's full evidence —
internal and external metrics with pooled intervals, and the paired deltas against every baseline arm."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd

from medssl.export.card import model_card
from medssl.export.spec import SPEC_FILE, ModelSpec

METRICS = ("auroc", "balanced_accuracy", "sensitivity", "specificity", "auprc")


def _interval(row: pd.Series, column: str) -> dict:
    return {k: row[c] for k, c in [(column, column), (f"{column}_ci_low", f"{column}_ci_low"),
                                   (f"{column}_ci_high", f"{column}_ci_high")] if c in row and pd.notna(row[c])}


def evidence(summary: pd.DataFrame, rung: str, protocol: str, arm: str) -> dict:
    """The card's sites and deltas for one registered (rung, protocol, arm), from the report's summary. The
    report pairs SSL against every other arm; a registered baseline arm gets those pairs from its own side
    (this arm − SSL: the SSL − arm difference and interval, negated)."""
    at = (summary["rung"] == rung) & (summary["protocol"] == protocol)
    sites, deltas = {}, {}
    for _, row in summary[at & (summary["arm"] == arm)].iterrows():
        sites[str(row.get("site", "internal"))] = {k: v for m in METRICS for k, v in _interval(row, m).items()}
    for _, row in summary[at & (summary["arm"] == "ssl")].iterrows():
        site = str(row.get("site", "internal"))
        for column in [c for c in row.index if c.startswith("delta_auroc_vs_") and not c.endswith(("_low", "_high"))]:
            other = column.removeprefix("delta_auroc_vs_")
            if pd.isna(row[column]) or (arm != "ssl" and other != arm):
                continue
            low, high = row.get(f"{column}_ci_low"), row.get(f"{column}_ci_high")
            if arm == "ssl":
                deltas[f"{other} ({site})"] = {"delta": row[column], "ci_low": low, "ci_high": high}
            else:
                deltas[f"ssl ({site})"] = {"delta": -row[column], "ci_low": -high, "ci_high": -low}
    return {"sites": sites, "deltas": deltas}


def refresh_model_cards(tracker, summary: pd.DataFrame) -> int:
    """Rewrite model/model_card.md of every registered version made by this experiment's runs; returns how
    many cards were rewritten (0 without a tracking server or registered models)."""
    experiment = getattr(tracker, "experiment", None)
    if not experiment or summary.empty:
        return 0
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracker.tracking_uri, tracker.tracking_uri)
    known = client.get_experiment_by_name(experiment)
    if known is None:
        return 0
    written = 0
    for version in client.search_model_versions():
        tags = version.tags or {}
        if "medssl.rung" not in tags or client.get_run(version.run_id).info.experiment_id != known.experiment_id:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            spec_path = mlflow.artifacts.download_artifacts(run_id=version.run_id, dst_path=tmp,
                                                            artifact_path=f"model/data/medssl_model/{SPEC_FILE}",
                                                            tracking_uri=tracker.tracking_uri)
            spec = ModelSpec.model_validate_json(Path(spec_path).read_text())
        facts = evidence(summary, tags["medssl.rung"], tags.get("medssl.protocol", ""), tags.get("medssl.arm", "ssl"))
        data = {"labelled patients in the rung": spec.lineage.labelled_patients,
                "registered as": f"{version.name} v{version.version}"}
        tracker.log_text(model_card(spec, data=data, **facts), "model/model_card.md", run_id=version.run_id)
        written += 1
    return written
