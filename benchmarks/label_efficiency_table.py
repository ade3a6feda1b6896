"""The markdown table of bench_label_efficiency.py's results (one row per task, recipe and site)."""
from __future__ import annotations

from pathlib import Path


def _cell(value: list[float]) -> str:
    point, lo, hi = value
    return f"{point:.2f} [{lo:.2f}, {hi:.2f}]"


def _delta(value: list[float]) -> str:
    point, lo, hi = value
    return f"{point:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def write_table(result: dict, path: Path) -> None:
    s = result["settings"]
    lines = [f"# Label efficiency across sites (benchmarks/bench_label_efficiency.py)", "",
             f"Pretraining budget {s['minutes']} min per recipe (medssl's loop, `train.budget_minutes`), "
             f"{s['seeds']} seeds, {s['boot']} bootstrap replicates over test subjects and seeds, "
             f"{s['machine']}, torch threads {s['torch_threads']}, wall {s['wall_s']} s"
             + (" — SMALL CHECK RUN, not a measurement" if s["small"] else "") + ".", ""]
    rows = result["rows"]
    for task in dict.fromkeys(r["task"] for r in rows):
        for metric, title in (("balanced_accuracy", "balanced accuracy"), ("auroc", "AUROC")):
            lines += [f"## {task}: {title} (95% interval); Δ vs engineered features at k = 10 (paired)", "",
                      "| recipe | steps | site | k = 5 | k = 10 | k = 25 | Δ features, k = 10 |",
                      "|---|---|---|---|---|---|---|"]
            for recipe in dict.fromkeys(r["recipe"] for r in rows):
                for site in ("internal", "external"):
                    by_k = {r["k"]: r for r in rows if r["task"] == task and r["recipe"] == recipe
                            and r["site"] == site}
                    cells = [_cell(by_k[k][metric]) for k in (5, 10, 25)]
                    lines.append(f"| {recipe} | {by_k[10].get('steps', '')} | {site} | " + " | ".join(cells)
                                 + f" | {_delta(by_k[10][metric + '_vs_features'])} |")
            lines.append("")
    path.write_text("\n".join(lines) + "\n")
