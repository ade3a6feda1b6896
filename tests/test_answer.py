"""The answer on the parent MLflow run, read back through MLflow: headline metrics per rung and arm with their
paired deltas and interval limits, the summary as an MLflow table, the verdict as the run's description."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from rich.console import Console

from medssl.evaluate.report import build_report
from medssl.evaluate.verdict import verdict
from medssl.tracking.tracker import Tracker
from test_report import fake_ladder


def test_parent_run_carries_metrics_table_and_verdict(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # MlflowClient.load_table searches the process-wide store
    tracker = Tracker("answer", tracking_uri=uri, outbox_dir=tmp_path / "outbox", end_grace_s=0)
    results = fake_ladder(tmp_path)
    with tracker.run("pipeline") as parent:
        with tracker.run("ladder"):  # the report names the parent explicitly, whatever run is open
            paths = build_report(results, tmp_path / "report", tracker=tracker, run_id=parent.info.run_id,
                                 console=Console(file=open(tmp_path / "out.txt", "w")), n_boot=100)
    client = MlflowClient(uri)
    run = client.get_run(parent.info.run_id)
    summary = pd.read_csv(paths["summary_csv"])
    ssl = summary[(summary["arm"] == "ssl") & (summary["rung"] == "per_class_25")].iloc[0]
    metrics = run.data.metrics
    prefix = "internal/per_class_25/finetune"
    assert metrics[f"{prefix}/ssl/auroc"] == pytest.approx(ssl["auroc"])
    assert metrics[f"{prefix}/ssl/balanced_accuracy_ci_low"] == pytest.approx(ssl["balanced_accuracy_ci_low"])
    for arm in ("scratch", "features"):
        for suffix in ("", "_ci_low", "_ci_high"):
            name = f"delta_auroc_vs_{arm}{suffix}"
            assert metrics[f"{prefix}/ssl/{name}"] == pytest.approx(ssl[name])
    scratch = summary[(summary["arm"] == "scratch") & (summary["rung"] == "per_class_5")].iloc[0]
    assert metrics["internal/per_class_5/finetune/scratch/auroc_ci_high"] == pytest.approx(scratch["auroc_ci_high"])

    note = run.data.tags["mlflow.note.content"]
    lines = paths["verdict_md"].read_text().splitlines()
    assert len(lines) == 2 and all(line in note for line in lines)
    assert note.index("Does SSL help?") < note.index("per_class_5")  # the answer first
    assert run.data.tags["medssl.verdict.1"] == lines[1]

    table = client.load_table(run.info.experiment_id, "report/summary_table.json", run_ids=[run.info.run_id])
    assert len(table) == len(summary) and set(table["arm"]) == {"ssl", "scratch", "features"}
    child = client.search_runs([run.info.experiment_id], "tags.mlflow.runName = 'ladder'")[0]
    assert not any("/" in k for k in child.data.metrics)  # nothing landed on the open child run
    assert {a.path for a in client.list_artifacts(run.info.run_id, "report")} >= {
        "report/summary.csv", "report/verdict.md", "report/label_efficiency.png"}


def _row(**deltas) -> pd.Series:
    out = {}
    for arm, (d, low, high) in deltas.items():
        out.update({f"delta_auroc_vs_{arm}": d, f"delta_auroc_vs_{arm}_ci_low": low,
                    f"delta_auroc_vs_{arm}_ci_high": high})
    return pd.Series(out)


def test_verdict_claims_a_win_only_when_the_paired_interval_excludes_zero():
    arms = ["scratch", "features"]
    assert verdict(_row(scratch=(.07, .02, .12), features=(.05, .01, .09)), arms) == (
        "SSL beats scratch and features: +0.07 AUROC [0.02, 0.12] vs scratch, +0.05 [0.01, 0.09] vs features")
    assert verdict(_row(scratch=(.07, .02, .12), features=(.01, -.03, .05)), arms).startswith(
        "SSL beats scratch; no evidence vs features:")
    assert verdict(_row(scratch=(.02, -.01, .05), features=(-.01, -.05, .03)), arms).startswith(
        "no evidence that SSL helps: +0.02 AUROC [-0.01, 0.05] vs scratch, -0.01 [-0.05, 0.03] vs features")
    assert verdict(_row(scratch=(.07, .02, .12), features=(-.08, -.12, -.03)), arms).startswith(
        "SSL beats scratch but is worse than features:")
    assert verdict(_row(scratch=(.07, .02, .12), features=(np.nan, np.nan, np.nan)), arms).endswith(
        "(no features arm to compare with)")
    assert verdict(_row(scratch=(.1, np.nan, np.nan)), arms).startswith("no evidence that SSL helps: +0.10 AUROC "
                                                                         "[no interval]")
