"""The ladder's report: label-efficiency curve (PNG), tables (Markdown, HTML, CSV) and a terminal table.

Aggregation over seeds (documented here because every number in the report depends on it):
- a metric's value is the MEAN over the seeds that finished for that (rung, protocol, init);
- its 95% interval is the mean of those seeds' patient-bootstrap limits (with one seed, exactly that seed's
  interval). It describes test-set sampling uncertainty; the spread between seeds is given separately (SD);
- the SSL - scratch difference is the mean of the per-seed paired differences, its interval the mean of the
  per-seed paired-bootstrap limits (same test patients resampled for both models).
Failed children are listed, never averaged in.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich import box
from rich.table import Table

from medssl.evaluate import plots

KEYS = ["rung", "protocol", "init"]
# (column in results.csv, header); those with bootstrap limits get "mean [low, high]"
TABLE_METRICS = [("auroc", "AUROC"), ("auprc", "AUPRC"), ("balanced_accuracy", "Bal. acc."),
                 ("sensitivity", "Sens."), ("specificity", "Spec."), ("sens_at_spec90", "Sens@90%Spec"),
                 ("sens_at_spec95", "Sens@95%Spec"), ("f1", "F1"), ("brier", "Brier"), ("ece", "ECE"),
                 ("delta_auroc", "ΔAUROC SSL−scratch")]


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (rung, protocol, init): seed means of every metric and of its CI limits."""
    ok = results[results["status"] == "ok"].copy()
    if ok.empty:
        return pd.DataFrame(columns=KEYS + ["n_labelled", "seeds"])
    numeric = [c for c in ok.columns if c not in KEYS + ["key", "status", "error", "run_id", "seed"]
               and pd.api.types.is_numeric_dtype(ok[c])]
    grouped = ok.groupby(KEYS, sort=False)
    summary = grouped[numeric].mean()
    summary["seeds"] = grouped.size()
    summary["auroc_sd"] = grouped["auroc"].std(ddof=1) if "auroc" in ok else np.nan
    summary = summary.reset_index()
    # protocols in the order the ladder ran them (linear before finetune by default), rungs by budget
    order = {p: i for i, p in enumerate(dict.fromkeys(ok["protocol"]))}
    summary["_order"] = summary["protocol"].map(order)
    summary = summary.sort_values(["_order", "n_labelled", "init"], kind="stable").drop(columns="_order")
    return summary.reset_index(drop=True)


def build_report(results: pd.DataFrame, out_dir, tracker=None, metric: str = "auroc",
                 console: Console | None = None) -> dict[str, Path]:
    """Write summary.csv, table.md, table.html and label_efficiency.png; print the table; log to `tracker`'s
    open run (the ladder's parent) when given. Returns {name: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if "key" in results:  # a raw results.csv: the latest row per child (a failure later redone counts once)
        results = results.drop_duplicates("key", keep="last").reset_index(drop=True)
    summary = summarise(results)
    failed = results[results["status"] != "ok"] if "status" in results else results.iloc[0:0]
    cells = formatted(summary)
    paths = {"summary_csv": out_dir / "summary.csv", "table_md": out_dir / "table.md",
             "table_html": out_dir / "table.html"}
    summary.to_csv(paths["summary_csv"], index=False)
    paths["table_md"].write_text(markdown(cells, failed))
    paths["table_html"].write_text(html(cells, failed))
    if len(summary) and metric in summary:
        paths["curve_png"] = plots.save(plots.label_efficiency_figure(summary, metric),
                                        out_dir / "label_efficiency.png")
    (console or Console()).print(rich_table(summary, failed))
    if tracker is not None:
        for path in paths.values():
            tracker.log_artifact(path, "report")
    return paths


def formatted(summary: pd.DataFrame) -> pd.DataFrame:
    """Display strings: "0.812 [0.701, 0.905]" where limits exist, "–" where a metric does not apply."""
    out = pd.DataFrame({"Rung": summary["rung"], "Labelled": summary["n_labelled"].round().astype("Int64"),
                        "Protocol": summary["protocol"], "Init": summary["init"], "Seeds": summary["seeds"]})
    for column, header in TABLE_METRICS:
        if column in summary:
            out[header] = [cell(summary, i, column) for i in range(len(summary))]
    if "auroc_sd" in summary:
        out["AUROC SD (seeds)"] = [_num(v) for v in summary["auroc_sd"]]
    return out


def cell(summary: pd.DataFrame, i: int, column: str) -> str:
    value = summary.at[i, column]
    low, high = summary.get(f"{column}_ci_low"), summary.get(f"{column}_ci_high")
    if low is None or pd.isna(low.iat[i]):
        return _num(value)
    return f"{_num(value)} [{_num(low.iat[i])}, {_num(high.iat[i])}]"


def _num(value) -> str:
    return "–" if value is None or pd.isna(value) else f"{float(value):.3f}"


def markdown(cells: pd.DataFrame, failed: pd.DataFrame) -> str:
    lines = ["# Label efficiency: SSL vs scratch", "",
             "Mean over seeds; [95% CI] = mean of the seeds' patient-bootstrap limits. "
             "Linear-protocol scratch = frozen randomly initialised encoder.", ""]
    lines.append("| " + " | ".join(cells.columns) + " |")
    lines.append("|" + "|".join("---" for _ in cells.columns) + "|")
    for row in cells.itertuples(index=False):
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    lines += _failures_md(failed)
    return "\n".join(lines) + "\n"


def _failures_md(failed: pd.DataFrame) -> list[str]:
    if failed.empty:
        return []
    lines = ["", f"## Failed runs ({len(failed)})", ""]
    lines += [f"- `{row['key']}`: {row.get('error', '')}" for _, row in failed.iterrows()]
    return lines


def html(cells: pd.DataFrame, failed: pd.DataFrame) -> str:
    body = cells.to_html(index=False, border=0, classes="medssl-table", escape=True)
    fails = "" if failed.empty else "<h2>Failed runs</h2>" + failed[["key", "error"]].to_html(index=False, border=0)
    style = ("<style>table{border-collapse:collapse;font-family:sans-serif;font-size:13px}"
             "td,th{padding:4px 8px;border-bottom:1px solid #ddd;text-align:left}</style>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>medssl ladder report</title>{style}</head>"
            f"<body><h1>Label efficiency: SSL vs scratch</h1><p>Mean over seeds; [95% CI] = mean of the seeds' "
            f"patient-bootstrap limits. Linear-protocol scratch = frozen randomly initialised encoder.</p>"
            f"{body}{fails}</body></html>\n")


def rich_table(summary: pd.DataFrame, failed: pd.DataFrame) -> Table:
    """Compact for an 80-column terminal: AUROC and AUPRC, CIs for AUROC and the SSL - scratch difference
    (every metric is in table.md / table.html)."""
    table = Table(title="Label efficiency: test metrics, mean over seeds [95% CI]", box=box.SIMPLE_HEAD,
                  padding=(0, 1),
                  caption=f"{len(failed)} failed run(s): see table.md" if len(failed) else None)
    table.add_column("Rung", overflow="fold")  # the one column that may wrap on a narrow terminal
    for column in ("n", "Protocol", "Init"):
        table.add_column(column, no_wrap=True)
    for column, width in (("AUROC", 13), ("AUPRC", 5), ("ΔAUROC\nSSL−scratch", 15)):  # "[-0.531–-0.012]"
        table.add_column(column, justify="right", min_width=width, no_wrap=True)
    for i in range(len(summary)):
        row = summary.iloc[i]
        table.add_row(str(row["rung"]), f"{row['n_labelled']:.0f}", str(row["protocol"]), str(row["init"]),
                      _compact(summary, i, "auroc"), _num(row.get("auprc")), _compact(summary, i, "delta_auroc"))
    return table


def _compact(summary: pd.DataFrame, i: int, column: str) -> str:
    if column not in summary:
        return "–"
    low, high = summary.get(f"{column}_ci_low"), summary.get(f"{column}_ci_high")
    if low is None or pd.isna(low.iat[i]):
        return _num(summary.at[i, column])
    return f"{_num(summary.at[i, column])}\n[{_num(low.iat[i])}–{_num(high.iat[i])}]"  # 2 lines: fits 80 cols
