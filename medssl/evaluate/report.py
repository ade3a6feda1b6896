"""The ladder's report: label-efficiency curve (PNG), tables (Markdown, HTML, CSV) and a terminal table.

Aggregation over seeds (documented here because every number in the report depends on it):
- a metric's value is the MEAN over the seeds that finished for that (rung, protocol, init);
- AUROC and the SSL - scratch AUROC difference get a SEED-POOLED interval when the runs' test predictions
  are on disk (results.csv "predictions"): test patients are resampled once per replicate, for all seeds
  together, and the replicate's value is the mean over seeds (for the difference: the mean over seeds of
  SSL - scratch on the same resample). With one seed this is exactly that run's interval;
- every other interval (and AUROC when predictions are missing) is the mean of the seeds' patient-bootstrap
  limits. Intervals describe test-set sampling; the spread between seeds is given separately (SD).
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
from medssl.evaluate.bootstrap import patient_resamples
from medssl.evaluate.metrics import multiclass_metrics, resample_metrics

KEYS = ["rung", "protocol", "init"]
CAPTION = ("Test metrics, mean over seeds. [95% CI]: patient-level bootstrap; for AUROC and ΔAUROC pooled over "
           "seeds (all seeds' predictions on the same resampled patients) when predictions are on disk, otherwise "
           "the mean of the seeds' limits. Linear-protocol scratch = frozen randomly initialised encoder.")
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
    bookkeeping = KEYS + ["key", "status", "error", "run_id", "seed", "model_logged", "bootstrap_seed", "bootstrap_n"]
    numeric = [c for c in ok.columns if c not in bookkeeping and pd.api.types.is_numeric_dtype(ok[c])]
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


def with_pooled_intervals(summary: pd.DataFrame, results: pd.DataFrame, n_boot: int) -> pd.DataFrame:
    """Replace the AUROC and delta-AUROC limits by seed-pooled ones where every seed's predictions exist."""
    if "predictions" not in results or summary.empty:
        return summary
    summary = summary.copy()
    summary["auroc_ci_method"] = "mean of per-seed limits"
    ok = results[results["status"] == "ok"]
    for i, row in summary.iterrows():
        part = ok[(ok["rung"] == row["rung"]) & (ok["protocol"] == row["protocol"]) & (ok["init"] == row["init"])]
        seed = int(part["bootstrap_seed"].min()) if "bootstrap_seed" in part else 0
        pooled = pooled_interval(_frames(part["predictions"]), None, n_boot, seed)
        if pooled is not None:
            summary.loc[i, ["auroc_ci_low", "auroc_ci_high", "auroc_ci_method"]] = [*pooled, "seed-pooled"]
        if row["init"] == "ssl" and "delta_auroc_ci_low" in summary:
            pairs = ok[(ok["rung"] == row["rung"]) & (ok["protocol"] == row["protocol"])]
            scratch = pairs[pairs["init"] == "scratch"].set_index("seed")["predictions"]
            mine = part.set_index("seed")["predictions"]
            both = mine.index.intersection(scratch.index)
            ssl_frames, scratch_frames = _frames(mine[both]), _frames(scratch[both])
            pooled = pooled_interval(ssl_frames, scratch_frames, n_boot, seed) if scratch_frames else None
            if pooled is not None:
                summary.loc[i, ["delta_auroc_ci_low", "delta_auroc_ci_high"]] = list(pooled)
    return summary


def pooled_interval(frames_a, frames_b, n_boot: int, seed: int) -> tuple[float, float] | None:
    """95% CI of mean-over-seeds AUROC (of A, or of A - B per seed) on joint patient resamples of the test
    set; None when a prediction file is missing or the seeds were scored on different images."""
    if not frames_a or (frames_b is not None and len(frames_b) != len(frames_a)):
        return None
    ids = frames_a[0]["image_id"].tolist()
    frames = [f.set_index("image_id") for f in frames_a + list(frames_b or [])]
    if any(set(f.index) != set(ids) for f in frames) or "patient_id" not in frames[0]:
        return None
    frames = [f.loc[ids] for f in frames]
    y, groups = frames[0]["label"].to_numpy(int), frames[0]["patient_id"].tolist()
    scores = [_scores(f) for f in frames]
    sign = [1.0] * len(frames_a) + [-1.0] * (len(frames) - len(frames_a))
    draws = []
    for idx in patient_resamples(groups, n_boot, seed):
        if len(np.unique(y[idx])) < len(np.unique(y)):
            continue  # a class is missing from this resample: AUROC undefined (as in the per-run bootstrap)
        draws.append(sum(s * _auroc(y[idx], sc[idx]) for s, sc in zip(sign, scores)) / len(frames_a))
    if not draws:
        return None
    low, high = np.percentile(draws, [2.5, 97.5])
    return float(low), float(high)


def _frames(paths) -> list[pd.DataFrame] | None:
    paths = [Path(p) for p in paths if isinstance(p, str) and p]
    if not paths or not all(p.is_file() for p in paths):
        return None
    return [pd.read_csv(p) for p in paths]


def _scores(frame: pd.DataFrame) -> np.ndarray:
    if "score" in frame:
        return frame["score"].to_numpy(float)  # (N,)
    return frame[[c for c in frame.columns if c.startswith("score_")]].to_numpy(float)  # (N, K)


def _auroc(y, score) -> float:
    return resample_metrics(y, score, 0.5)["auroc"] if score.ndim == 1 else multiclass_metrics(y, score)["auroc"]


def build_report(results: pd.DataFrame, out_dir, tracker=None, metric: str = "auroc",
                 console: Console | None = None, n_boot: int | None = None) -> dict[str, Path]:
    """Write summary.csv, table.md, table.html and label_efficiency.png; print the table; log to `tracker`'s
    open run (the ladder's parent) when given. Returns {name: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if "key" in results:  # a raw results.csv: the latest row per child (a failure later redone counts once)
        results = results.drop_duplicates("key", keep="last").reset_index(drop=True)
    summary = with_pooled_intervals(summarise(results), results, n_boot or _ladder_n_boot(results))
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


def _ladder_n_boot(results: pd.DataFrame) -> int:
    """The ladder's own replicate count (so with one seed the pooled interval is the run's), else 1000."""
    if "bootstrap_n" in results and results["bootstrap_n"].notna().any():
        return int(results["bootstrap_n"].max())
    return 1000


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
             CAPTION, ""]
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
            f"<body><h1>Label efficiency: SSL vs scratch</h1><p>{CAPTION}</p>"
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
