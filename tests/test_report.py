"""The report's files exist and its numbers are the results CSV's, aggregated as documented."""
import itertools

import numpy as np
import pandas as pd
from rich.console import Console

from medssl.evaluate.report import build_report, summarise

METRICS = ["auroc", "auprc", "balanced_accuracy", "sensitivity", "specificity", "sens_at_spec90",
           "sens_at_spec95", "f1", "brier", "ece"]


def fake_results() -> pd.DataFrame:
    """2 rungs x 2 seeds x 2 protocols x {scratch, ssl}, as the ladder writes them, plus one failed child."""
    rng = np.random.default_rng(0)
    rows = []
    for (rung, n), seed, protocol, init in itertools.product([("per_class_5", 10), ("per_class_25", 50)],
                                                             [0, 1], ["linear", "finetune"], ["scratch", "ssl"]):
        row = {"key": f"{rung}/seed{seed}/{protocol}/{init}", "rung": rung, "seed": seed, "protocol": protocol,
               "init": init, "n_labelled": n, "status": "ok", "error": "", "run_id": f"r{len(rows)}",
               "val_auroc": rng.random()}
        for m in METRICS:
            row[m] = rng.uniform(0.3, 0.9)
        for m in ("auroc", "auprc", "balanced_accuracy"):
            row[f"{m}_ci_low"], row[f"{m}_ci_high"] = row[m] - 0.1, row[m] + 0.08
        if init == "ssl":
            row["delta_auroc"] = rng.uniform(-0.1, 0.2)
            row["delta_auroc_ci_low"], row["delta_auroc_ci_high"] = row["delta_auroc"] - 0.05, row["delta_auroc"] + 0.05
        rows.append(row)
    rows.append({"key": "per_class_50/seed0/linear/ssl", "rung": "per_class_50", "seed": 0, "protocol": "linear",
                 "init": "ssl", "n_labelled": 100, "status": "failed", "error": "the training subset lacks class 1"})
    return pd.DataFrame(rows)


def test_report_files_and_numbers(tmp_path):
    results = fake_results()
    results.to_csv(tmp_path / "results.csv", index=False)
    results = pd.read_csv(tmp_path / "results.csv")  # as the pipeline reads it back
    console = Console(record=True, width=200)
    paths = build_report(results, tmp_path / "report", console=console)
    for name in ("summary_csv", "table_md", "table_html", "curve_png"):
        assert paths[name].is_file() and paths[name].stat().st_size > 0
    assert paths["curve_png"].read_bytes()[:4] == b"\x89PNG"

    summary = pd.read_csv(paths["summary_csv"])
    ok = results[results["status"] == "ok"]
    assert len(summary) == 8 and set(summary["seeds"]) == {2}
    for _, row in summary.iterrows():
        part = ok[(ok["rung"] == row["rung"]) & (ok["protocol"] == row["protocol"]) & (ok["init"] == row["init"])]
        for m in METRICS + ["auroc_ci_low", "auroc_ci_high"]:
            assert np.isclose(row[m], part[m].mean())
        if row["init"] == "ssl":
            assert np.isclose(row["delta_auroc"], part["delta_auroc"].mean())

    md, page, text = paths["table_md"].read_text(), paths["table_html"].read_text(), console.export_text()
    one = ok[(ok["rung"] == "per_class_25") & (ok["protocol"] == "finetune") & (ok["init"] == "ssl")]
    auroc_cell = (f"{one['auroc'].mean():.3f} [{one['auroc_ci_low'].mean():.3f}, "
                  f"{one['auroc_ci_high'].mean():.3f}]")
    delta_cell = f"{one['delta_auroc'].mean():.3f}"
    for document in (md, page):
        assert auroc_cell in document and delta_cell in document
    terminal_cell = (f"{one['auroc'].mean():.3f}", f"[{one['auroc_ci_low'].mean():.3f}–"
                     f"{one['auroc_ci_high'].mean():.3f}]", delta_cell)
    assert all(part in text for part in terminal_cell)
    assert "per_class_50/seed0/linear/ssl" in md and "lacks class 1" in page  # failures reported, not averaged
    assert "per_class_50" not in summary["rung"].tolist()


def test_summary_of_only_failures_is_empty_but_report_still_written(tmp_path):
    results = fake_results().tail(1)
    assert summarise(results).empty
    paths = build_report(results, tmp_path, console=Console(file=open(tmp_path / "out.txt", "w")))
    assert "lacks class 1" in paths["table_md"].read_text() and "curve_png" not in paths
