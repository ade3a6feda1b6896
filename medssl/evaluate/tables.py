"""The report's tables: every metric with its pooled interval (Markdown, HTML) and a compact terminal view."""
from __future__ import annotations

import pandas as pd
from rich import box
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from medssl.evaluate.verdict import arms_compared

# (column in the summary, header); "mean [low, high]" where the summary has pooled limits
TABLE_METRICS = [("auroc", "AUROC"), ("auprc", "AUPRC"), ("balanced_accuracy", "Bal. acc."),
                 ("sensitivity", "Sens."), ("specificity", "Spec."), ("sens_at_spec90", "Sens@90%Spec"),
                 ("sens_at_spec95", "Sens@95%Spec"), ("f1", "F1"), ("brier", "Brier"), ("ece", "ECE")]
TITLE = "Label efficiency: SSL vs the baselines"
LABELS = {"auroc": "ΔAUROC", "balanced_accuracy": "ΔBal.acc"}


def formatted(summary: pd.DataFrame) -> pd.DataFrame:
    """Display strings: "0.812 [0.701, 0.905]" where limits exist, "–" where a metric does not apply."""
    out = pd.DataFrame({"Site": summary["site"], "Rung": summary["rung"],
                        "Budget": [f"{_count(b)} {u}" for b, u in zip(summary["budget"], summary.get(
                            "budget_unit", pd.Series("", index=summary.index)))],
                        "Protocol": summary["protocol"], "Arm": summary["arm"],
                        "Runs (seeds × repeats)": [f"{r} ({s} × {p})" for r, s, p in
                                                   zip(summary["runs"], summary["seeds"], summary["repeats"])]})
    if "n_patients_used" in summary:  # every labelled patient a run saw outside the test split
        out["Labelled patients used"] = [_count(v) for v in summary["n_patients_used"]]
    if "labels_note" in summary:
        out["Labels note"] = summary["labels_note"].fillna("")
    for column, header in TABLE_METRICS:
        if column in summary:
            out[header] = [cell(summary, i, column) for i in range(len(summary))]
    for arm in arms_compared(summary):
        for metric, label in LABELS.items():
            column = f"delta_{metric}_vs_{arm}"
            if column in summary:
                out[f"{label} SSL−{arm}"] = [cell(summary, i, column) for i in range(len(summary))]
    return out


def cell(summary: pd.DataFrame, i: int, column: str, sep: str = " ") -> str:
    value = summary.at[i, column]
    low, high = summary.get(f"{column}_ci_low"), summary.get(f"{column}_ci_high")
    if low is None or pd.isna(low.iat[i]):
        return _num(value)
    return f"{_num(value)}{sep}[{_num(low.iat[i])}, {_num(high.iat[i])}]"


def _count(value) -> str:
    return "–" if value is None or pd.isna(value) else f"{float(value):.0f}"


def _num(value) -> str:
    return "–" if value is None or pd.isna(value) else f"{float(value):.3f}"


def markdown(summary: pd.DataFrame, failed: pd.DataFrame, verdicts: list[str], method: str) -> str:
    cells = formatted(summary)
    lines = [f"# {TITLE}", "", "## Verdict per rung", ""] + [f"- {v}" for v in verdicts] + ["", method, ""]
    lines.append("| " + " | ".join(cells.columns) + " |")
    lines.append("|" + "|".join("---" for _ in cells.columns) + "|")
    for row in cells.itertuples(index=False):
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    if not failed.empty:
        lines += ["", f"## Failed runs ({len(failed)})", ""]
        lines += [f"- `{row['key']}`: {row.get('error', '')}" for _, row in failed.iterrows()]
    return "\n".join(lines) + "\n"


def html(summary: pd.DataFrame, failed: pd.DataFrame, verdicts: list[str], method: str) -> str:
    from html import escape
    body = formatted(summary).to_html(index=False, border=0, classes="medssl-table", escape=True)
    fails = "" if failed.empty else "<h2>Failed runs</h2>" + failed[["key", "error"]].to_html(index=False, border=0)
    items = "".join(f"<li>{escape(v)}</li>" for v in verdicts)
    style = ("<style>table{border-collapse:collapse;font-family:sans-serif;font-size:13px}"
             "td,th{padding:4px 8px;border-bottom:1px solid #ddd;text-align:left}</style>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>medssl ladder report</title>{style}</head>"
            f"<body><h1>{TITLE}</h1><h2>Verdict per rung</h2><ul>{items}</ul><p>{escape(method)}</p>"
            f"{body}{fails}</body></html>\n")


def rich_table(summary: pd.DataFrame, failed: pd.DataFrame) -> Table:
    """Compact for an 80-column terminal: AUROC, balanced accuracy and the paired ΔAUROC vs each arm, two lines
    a cell (every metric is in table.md / table.html)."""
    table = Table(title=f"{TITLE}: test metrics, mean over runs [95% pooled interval]", box=box.SIMPLE_HEAD,
                  padding=(0, 1), caption=f"{len(failed)} failed run(s): see table.md" if len(failed) else None)
    sites = summary["site"].nunique() > 1 if len(summary) else False
    table.add_column("Rung", overflow="fold")  # the one column that may wrap on a narrow terminal
    for column in (["Site"] if sites else []) + ["budget", "Protocol", "Arm"]:
        table.add_column(column, no_wrap=True)
    arms = arms_compared(summary)
    for column in ["AUROC", "Bal.acc"] + [f"ΔAUROC\nvs {a}" for a in arms]:
        table.add_column(column, justify="right", min_width=13, no_wrap=True)
    for i in range(len(summary)):
        row = summary.iloc[i]
        n = _count(row["budget"])
        values = [cell(summary, i, c, "\n") if c in summary else "–"
                  for c in ["auroc", "balanced_accuracy"] + [f"delta_auroc_vs_{a}" for a in arms]]
        table.add_row(*(Text(v) for v in [str(row["rung"]), *([str(row["site"])] if sites else []), n,
                                          str(row["protocol"]), str(row["arm"]), *values]))
    return table


def verdict_panel(verdicts: list[str]) -> Panel:
    # Text, not markup: "[uses 9 extra validation labels]" would read as a style tag
    return Panel(Text("\n".join(verdicts) or "no finished SSL run to judge"), title="Does SSL help?", expand=False)


# ------------------------------------------------------------------------ one evaluated model (medssl evaluate)
def evaluation_tables(values: dict, class_names: dict | None = None) -> tuple[Table, Table]:
    """(metrics with their patient-bootstrap 95% CI, confusion matrix with class names) of one model."""
    metrics = Table(title="External validation", box=box.SIMPLE_HEAD)
    for column, justify in (("metric", "left"), ("value", "right"), ("95% CI (patient bootstrap)", "right")):
        metrics.add_column(column, justify=justify)
    for column, header in TABLE_METRICS + [("threshold", "Threshold")]:
        if column in values:
            low, high = values.get(f"{column}_ci_low"), values.get(f"{column}_ci_high")
            interval = f"[{_num(low)}, {_num(high)}]" if low is not None and not pd.isna(low) else ""
            metrics.add_row(header, _num(values[column]), interval)
    from medssl.evaluate.metrics import confusion_from_metrics
    cm = confusion_from_metrics(values)  # (K, K): rows = truth
    names = [str((class_names or {}).get(k, k)) for k in range(cm.shape[0])]
    confusion = Table(title="Confusion matrix (rows: true class, columns: predicted)", box=box.SIMPLE_HEAD)
    confusion.add_column("true \\ predicted")
    for name in names:
        confusion.add_column(name, justify="right")
    for name, counts in zip(names, cm):
        confusion.add_row(name, *(str(int(c)) for c in counts))
    return metrics, confusion
