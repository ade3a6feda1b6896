"""The answer, in one line per rung: does SSL beat the baselines, by how much, how sure.

SSL "beats" an arm only when the paired 95% interval of SSL - arm (AUROC) lies above 0, "is worse" only when
it lies below 0; otherwise there is no evidence either way. The baselines every verdict must face are
scratch (trained with the same care) and the non-deep features arm; a ladder without one of them says so
rather than claiming a win. Other arms (random features) are shown alongside.

On the parent MLflow run (`log_answer`): the headline metrics per site, rung, protocol and arm as metrics, the
summary as an MLflow table, and the verdicts as the run's description (tag `mlflow.note.content`).
"""
from __future__ import annotations

import json
import math
import re

import pandas as pd

BASELINES = ("scratch", "features")  # what "SSL helps" must be paired against
HEADLINE = ("auroc", "balanced_accuracy")
TABLE_FILE = "report/summary_table.json"


def arms_compared(summary: pd.DataFrame) -> list[str]:
    """The arms with a delta column in the summary (`delta_auroc_vs_<arm>`), baselines first."""
    found = [c[len("delta_auroc_vs_"):] for c in summary.columns
             if c.startswith("delta_auroc_vs_") and not c.endswith(("_ci_low", "_ci_high"))]
    return [a for a in BASELINES if a in found] + [a for a in found if a not in BASELINES]


def verdict_lines(summary: pd.DataFrame) -> list[str]:
    """One line per SSL row (site, rung, protocol), in the summary's order."""
    lines = []
    for _, row in summary[summary["arm"] == "ssl"].iterrows():
        where = " · ".join(str(row[c]) for c in ("site", "rung", "protocol") if c in row and row[c] != "-")
        note = row.get("labels_note")
        note = f" [{note}]" if isinstance(note, str) and note else ""  # validation: split runs say so
        lines.append(f"{where}: {verdict(row, arms_compared(summary))}{note}")
    return lines


def verdict(row: pd.Series, arms: list[str]) -> str:
    """E.g. 'SSL beats scratch and features: +0.07 AUROC [0.02, 0.12] vs scratch, +0.05 [0.01, 0.09] vs
    features' or 'no evidence that SSL helps: ...'."""
    beats, worse, unclear, numbers = [], [], [], []
    for arm in arms:
        delta, low, high = (row.get(f"delta_auroc_vs_{arm}{s}") for s in ("", "_ci_low", "_ci_high"))
        if delta is None or not _finite(delta):
            continue
        numbers.append(f"{delta:+.2f}{' AUROC' if not numbers else ''} {_interval(low, high)} vs {arm}")
        if _finite(low) and low > 0:
            beats.append(arm)
        elif _finite(high) and high < 0:
            worse.append(arm)
        else:
            unclear.append(arm)
    if not numbers:
        return "no paired comparison (no baseline arm finished on these patients)"
    missing = [a for a in BASELINES if a not in beats + worse + unclear]
    return _sentence(beats, worse, unclear) + ": " + ", ".join(numbers) + (
        f" (no {' or '.join(missing)} arm to compare with)" if missing else "")


def _sentence(beats: list[str], worse: list[str], unclear: list[str]) -> str:
    if not beats and not worse:
        return "no evidence that SSL helps"
    parts = []
    if beats:
        parts.append("SSL beats " + _join(beats))
    if worse:
        parts.append(("but is worse than " if beats else "SSL is worse than ") + _join(worse))
    if unclear:
        parts.append("no evidence vs " + _join(unclear))
    return ", ".join(parts[:1]) + "".join((" " if p.startswith("but") else "; ") + p for p in parts[1:])


def _join(arms: list[str]) -> str:
    return arms[0] if len(arms) == 1 else ", ".join(arms[:-1]) + " and " + arms[-1]


def _interval(low, high) -> str:
    return f"[{low:.2f}, {high:.2f}]" if _finite(low) and _finite(high) else "[no interval]"


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


# ------------------------------------------------------------------------------------ the parent run
def parent_metrics(summary: pd.DataFrame) -> dict[str, float]:
    """{"<site>/<rung>/<protocol>/<arm>/<metric>": value} for the headline metrics, their interval limits and
    (SSL rows) the paired deltas vs every other arm with theirs."""
    out = {}
    for _, row in summary.iterrows():
        prefix = "/".join(_key(row[c]) for c in ("site", "rung", "protocol", "arm"))
        names = [f"{m}{s}" for m in HEADLINE for s in ("", "_ci_low", "_ci_high")]
        if row["arm"] == "ssl":
            names += [f"delta_{m}_vs_{a}{s}" for m in HEADLINE for a in arms_compared(summary)
                      for s in ("", "_ci_low", "_ci_high")]
        out.update({f"{prefix}/{name}": float(row[name]) for name in names if name in row and _finite(row[name])})
    return out


def _key(value) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(value))  # MLflow metric keys: letters, digits, _ - . / only


def description(lines: list[str], method: str) -> str:
    """The run page's description (Markdown): the verdicts first, then how the numbers were made."""
    body = "\n".join(f"- {line}" for line in lines) or "- no finished SSL run to judge"
    return f"### Does SSL help? (paired ΔAUROC, 95% interval)\n{body}\n\n{method}\n"


def log_answer(tracker, summary: pd.DataFrame, lines: list[str], method: str, run_id: str | None = None) -> None:
    """Metrics, table and description on the run `run_id` (the pipeline's parent run)."""
    tracker.log_metrics(parent_metrics(summary), run_id=run_id)
    log_table(tracker, summary, TABLE_FILE, run_id)
    text = description(lines, method)
    if hasattr(tracker, "set_description"):
        tracker.set_description(text, run_id=run_id)
    else:
        tracker.set_tags({"mlflow.note.content": text}, run_id=run_id)
    tracker.set_tags({f"medssl.verdict.{i}": line for i, line in enumerate(lines)}, run_id=run_id)


def log_table(tracker, frame: pd.DataFrame, artifact_file: str, run_id: str | None = None) -> None:
    """What `mlflow.log_table` writes (a pandas "split" JSON + the `mlflow.loggedArtifacts` tag that makes the
    UI show it as a table), sent through the tracker so an unreachable server queues it instead of losing it."""
    if hasattr(tracker, "log_table"):
        tracker.log_table(frame, artifact_file, run_id=run_id)
        return
    tracker.log_text(frame.to_json(orient="split", index=False), artifact_file, run_id=run_id)
    tracker.set_tags({"mlflow.loggedArtifacts": json.dumps([{"path": artifact_file, "type": "table"}])},
                     run_id=run_id)
