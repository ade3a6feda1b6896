"""The ladder's report: one row per (site, rung, protocol, arm), a verdict per rung, curve, tables, MLflow.

Aggregation (every number in the report depends on it; see evaluate.pooled for the details):
- a value is the MEAN over the cell's finished runs (seeds x split repeats) of their point metrics;
- its 95% interval is made from the runs' patient-bootstrap resamples POOLED across seeds and split repeats
  (never from averaged per-run limits), so it includes seed and split variance;
- SSL rows carry paired deltas vs every other arm (`delta_<metric>_vs_<arm>`), per resample on the same
  test patients; a verdict per rung says whether SSL beats scratch and features (evaluate.verdict);
- external sites (scored by evaluate.external) are rows of the same table with `site` = their name.
Metrics the vectorised bootstrap does not cover (sensitivity at fixed specificity, ECE) are point means
without an interval. Failed children are listed, never averaged in.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console

from medssl.evaluate import plots
from medssl.evaluate.pooled import GROUP, METHOD, comparisons, group_rows, load_children, normalised, paired_deltas
from medssl.evaluate.tables import html, markdown, rich_table, verdict_panel
from medssl.evaluate.verdict import log_answer, verdict_lines
from medssl.ingest.csv_safe import write_csv

ARM_ORDER = {"ssl": 0, "scratch": 1, "features": 2, "random_features": 3}
BOOKKEEPING = {"key", "status", "error", "run_id", "seed", "repeat", "model_logged", "bootstrap_seed",
               "bootstrap_n", "settings_digest"}


def summarise(results: pd.DataFrame, n_boot: int = 1000, external: dict | None = None,
              draws: dict | None = None) -> pd.DataFrame:
    """One row per (site, rung, protocol, arm). `external`: {site: rows like results.csv's (key, rung, arm,
    ..., predictions) scored on that site}. `draws` {test set: (B, G)} fixes the patient draws (tests)."""
    frames = [normalised(results)] + [normalised(rows, site) for site, rows in (external or {}).items()]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=GROUP + ["budget", "n_labelled", "runs", "seeds", "repeats"])
    children = [child for frame in frames for child in load_children(frame, n_boot, draws=draws)]
    stats = group_rows(children)
    records = {}
    for frame in frames:
        numeric = [c for c in frame.columns if _plain_metric(frame, c)]
        for group, part in frame.groupby(GROUP, sort=False):
            record = {**dict(zip(GROUP, group)), **part[numeric].mean().to_dict(), "runs": len(part),
                      "seeds": part["seed"].nunique(), "repeats": part["repeat"].nunique()}
            pooled = stats.get(group)
            record.update({**(pooled or {}), "runs": len(part), "runs_pooled": (pooled or {}).get("runs", 0),
                           "ci_method": "pooled resamples" if pooled else "no predictions on disk: no interval",
                           **_labels_used(part)})
            records[group] = record
    for ssl, other in comparisons(list(stats)):
        for name, value in paired_deltas(children, ssl, other).items():
            records[ssl][_versus(name, other[3])] = value
    return _ordered(pd.DataFrame(list(records.values())))


def _versus(name: str, arm: str) -> str:
    """delta_auroc_ci_low -> delta_auroc_vs_<arm>_ci_low; pairs -> pairs_vs_<arm>."""
    for suffix in ("_ci_low", "_ci_high"):
        if name.endswith(suffix):
            return f"{name[:-len(suffix)]}_vs_{arm}{suffix}"
    return f"{name}_vs_{arm}"


def _labels_used(part: pd.DataFrame) -> dict:
    """The budget (labelled patients of the rung when the ladder records them, else labelled images), and
    what the runs say about labels beyond it (validation: split) and the positive class."""
    patients = part.get("n_labelled_patients")
    has_patients = patients is not None and patients.notna().any()
    out = {"budget": float((patients if has_patients else part.get("n_labelled", pd.Series(np.nan))).mean()),
           "budget_unit": "labelled patients" if has_patients else "labelled images"}
    for column in ("labels_note", "positive_class"):
        if column in part:
            values = [str(v) for v in dict.fromkeys(part[column].dropna()) if str(v)]
            out[column] = "; ".join(values)
    return out


def _plain_metric(frame: pd.DataFrame, column: str) -> bool:
    """A column whose mean over runs is meaningful: not bookkeeping, never a per-run interval limit."""
    return (column not in BOOKKEEPING and column not in GROUP and pd.api.types.is_numeric_dtype(frame[column])
            and not column.endswith(("_ci_low", "_ci_high")) and not column.startswith(("delta_", "cm_", "boot_")))


def _ordered(summary: pd.DataFrame) -> pd.DataFrame:
    """Internal site first, protocols in the order the ladder ran them, rungs by budget, SSL first."""
    sites = {s: (s != "internal", i) for i, s in enumerate(dict.fromkeys(summary["site"]))}
    protocols = {p: i for i, p in enumerate(dict.fromkeys(summary["protocol"]))}
    key = pd.DataFrame({"site": summary["site"].map(sites), "protocol": summary["protocol"].map(protocols),
                        "n": summary["budget"],
                        "arm": summary["arm"].map(lambda a: ARM_ORDER.get(a, len(ARM_ORDER)))})
    order = key.sort_values(["site", "protocol", "n", "arm"], kind="stable").index
    return summary.loc[order].reset_index(drop=True)


def build_report(results: pd.DataFrame, out_dir, tracker=None, metric: str = "auroc", console: Console | None = None,
                 n_boot: int | None = None, external: dict | None = None, run_id: str | None = None) -> dict[str, Path]:
    """Write summary.csv, table.md, table.html, verdict.md and label_efficiency.png; print the table and the
    verdicts; with a tracker, put the answer on run `run_id` (the parent run; default: its open run)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if "key" in results:  # a raw results.csv: the latest row per child (a failure later redone counts once)
        results = results.drop_duplicates("key", keep="last").reset_index(drop=True)
    summary = summarise(results, n_boot or _ladder_n_boot(results), external)
    failed = results[results["status"] != "ok"] if "status" in results else results.iloc[0:0]
    lines, method = verdict_lines(summary), _method(summary) + _unscored(external or {})
    paths = {"summary_csv": out_dir / "summary.csv", "table_md": out_dir / "table.md",
             "table_html": out_dir / "table.html", "verdict_md": out_dir / "verdict.md"}
    write_csv(summary, paths["summary_csv"])
    paths["table_md"].write_text(markdown(summary, failed, lines, method))
    paths["table_html"].write_text(html(summary, failed, lines, method))
    paths["verdict_md"].write_text("\n".join(lines) + "\n")
    if len(summary) and metric in summary:
        paths["curve_png"] = plots.save(plots.label_efficiency_figure(summary, metric, "budget"),
                                        out_dir / "label_efficiency.png")
    console = console or Console()
    console.print(rich_table(summary, failed))
    console.print(verdict_panel(lines))
    if tracker is not None:
        log_answer(tracker, summary, lines, method, run_id)
        for path in paths.values():
            tracker.log_artifact(path, "report", run_id=run_id)
    return paths


def _method(summary: pd.DataFrame) -> str:
    """How the numbers were made, and which class the binary metrics are about."""
    positive = sorted({p for v in summary.get("positive_class", pd.Series(dtype=str)).dropna()
                       for p in str(v).split("; ") if p})
    named = (f" Binary metrics (sensitivity, specificity, AUPRC, F1) describe the positive class: "
             f"{' / '.join(positive)}." if positive else "")
    return METHOD + named


def _unscored(external: dict) -> str:
    """Runs an external site could not score (no kept model, a model that failed), said next to the method."""
    notes = []
    for site, rows in external.items():
        missed = rows[rows["status"] != "ok"] if "status" in rows and len(rows) else rows.iloc[0:0]
        if len(missed):
            reasons = "; ".join(f"{n} x {r}" for r, n in missed["error"].value_counts().items())
            notes.append(f" {site}: {len(missed)} of {len(rows)} runs not scored ({reasons}), see its scores.csv.")
    return "".join(notes)


def _ladder_n_boot(results: pd.DataFrame) -> int:
    """The ladder's own replicate count (so a lone run's pooled interval is its own), else 1000."""
    if "bootstrap_n" in results and results["bootstrap_n"].notna().any():
        return int(np.nanmax(results["bootstrap_n"].to_numpy(float)))
    return 1000
