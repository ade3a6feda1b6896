"""Per-child paired differences: each SSL child against every baseline arm of the same (repeat, rung, seed).

Made once every child has finished (rank 0, after the shards are merged), from the prediction files: the two
children were scored on the same test images, so one set of patient resamples serves both
(evaluate.bootstrap.paired_intervals). The baseline of an SSL child is the other arm's child in the same
protocol when there is one (ssl/linear vs random_features/linear, ssl/finetune vs scratch/finetune), else the
arm's own (features). Columns `delta_<metric>_vs_<arm>` (+ `_ci_low`, `_ci_high`; the report's names) go on the SSL rows of
results.csv and as metrics on the SSL child's MLflow run. The report pools children over seeds and repeats
itself; these are one child's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from medssl.evaluate.bootstrap import paired_intervals
from medssl.ingest.csv_safe import read_csv

METRICS = ("auroc", "balanced_accuracy")


def add_deltas(results: pd.DataFrame, tracker, n_boot: int) -> pd.DataFrame:
    """`results` (this ladder's rows) with the SSL rows' paired differences filled in."""
    ok = results[results["status"] == "ok"]
    out = results.copy()
    for index, row in ok[ok["arm"] == "ssl"].iterrows():
        same = ok[(ok["repeat"] == row["repeat"]) & (ok["rung"] == row["rung"]) & (ok["seed"] == row["seed"])]
        for arm in [a for a in dict.fromkeys(same["arm"]) if a != "ssl"]:
            theirs = same[same["arm"] == arm]
            partner = theirs[theirs["protocol"] == row["protocol"]]
            values = {}
            for metric, (diff, low, high) in _delta(row, (partner if len(partner) else theirs).iloc[0], n_boot).items():
                values.update({f"delta_{metric}_vs_{arm}": diff, f"delta_{metric}_vs_{arm}_ci_low": low,
                               f"delta_{metric}_vs_{arm}_ci_high": high})
            for name, value in values.items():
                out.loc[index, name] = value
            if row.get("run_id"):
                tracker.log_metrics({k: v for k, v in values.items() if np.isfinite(v)}, run_id=row["run_id"])
    return out


def _delta(mine: pd.Series, other: pd.Series, n_boot: int) -> dict[str, tuple[float, float, float]]:
    """{metric: (SSL - other, ci_low, ci_high)} on the same test images and patient resamples."""
    a, b = _predictions(mine["predictions"]), _predictions(other["predictions"])
    b = b.set_index("image_id").loc[a["image_id"]].reset_index()  # the same images in the same order
    cols = ["score"] if "score" in a else sorted(c for c in a if c.startswith("prob_"))
    scores = [frame[cols[0]].to_numpy() if cols == ["score"] else frame[cols].to_numpy() for frame in (a, b)]
    seed = int(mine.get("bootstrap_seed", 0) or 0)
    diffs, _ = paired_intervals(a["label"].to_numpy(), scores[0], a["predicted"].to_numpy(), scores[1],
                                b["predicted"].to_numpy(), a["patient_id"].astype(str).tolist(), n_boot, seed,
                                names=METRICS)
    return diffs


def _predictions(path) -> pd.DataFrame:
    return read_csv(Path(path))
