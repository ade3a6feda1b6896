"""Intervals over every variance source a ladder has: test patients, seeds and split repeats, per arm.

How a value and its interval are made (METHOD below is printed with every report):
1. every finished child (rung x protocol x arm x split repeat x seed) has its test predictions on disk;
2. children scored on the same images (one split repeat of one site) share ONE set of B patient resamples,
   drawn with the smallest bootstrap seed among them (so a lone run's interval is its own);
3. each child's metric on each of those B resamples: (B,) values, all at once (evaluate.resampled);
4. a group (site, rung, protocol, arm) reports the mean over its children of their point values, and the 2.5 /
   97.5 percentiles of ALL its children's resample values POOLED (repeats x seeds x B): the spread between
   seeds and between splits widens the interval; it is never an average of per-run limits;
5. a paired delta SSL - other arm matches children on (split repeat, seed) - the same images, the same
   resamples - takes the difference per resample and pools those the same way.
Children without predictions on disk give point values (means of results.csv) and no interval.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medssl.evaluate.bootstrap import resample_weights
from medssl.evaluate.resampled import VECTOR_METRICS, replicate_metrics

GROUP = ["site", "rung", "protocol", "arm"]
DELTA_METRICS = ("auroc", "balanced_accuracy")
METHOD = ("95% intervals: patient bootstrap within each split repeat x seed, the resamples of every run of a "
          "cell pooled across seeds and split repeats (percentiles of the pooled replicates, so they include "
          "seed and split variance); deltas are paired: same test patients, same resamples, per resample.")


@dataclass
class Child:
    """One finished run's test predictions, aligned to its test set's image order."""
    key: str
    group: tuple
    repeat: int
    seed: int
    test_set: tuple  # the image ids it was scored on, in the order the resamples index them
    values: dict  # {metric: (B,)} replicate values
    point: dict  # {metric: float}


def arm_of(results: pd.DataFrame) -> pd.Series:
    """The arm of every row: results' own `arm`, else the older `init` (where the linear protocol's frozen
    random encoder is named for what it is: random features, not scratch)."""
    if "arm" in results:
        return results["arm"].astype(str)
    init = results.get("init", pd.Series("ssl", index=results.index)).astype(str)
    linear = results.get("protocol", pd.Series("", index=results.index)).astype(str) == "linear"
    return init.mask(linear & (init == "scratch"), "random_features")


def normalised(results: pd.DataFrame, site: str = "internal") -> pd.DataFrame:
    """Finished rows with site, arm, repeat and protocol columns filled in (older files have no repeats)."""
    ok = results[results["status"] == "ok"].copy() if "status" in results else results.copy()
    ok["arm"] = arm_of(ok)
    ok["site"] = site
    ok["repeat"] = pd.to_numeric(ok["repeat"], errors="coerce").fillna(0).astype(int) if "repeat" in ok else 0
    ok["seed"] = pd.to_numeric(ok["seed"], errors="coerce").fillna(0).astype(int) if "seed" in ok else 0
    ok["protocol"] = ok["protocol"].fillna("-").astype(str) if "protocol" in ok else "-"
    return ok.reset_index(drop=True)


def load_children(rows: pd.DataFrame, n_boot: int, column: str = "predictions",
                  draws: dict | None = None) -> list[Child]:
    """Children whose prediction file exists, each with its replicate values. `draws` {test set: (B, G)}
    replaces the random patient draws (hand computations in tests)."""
    frames = {}
    for _, row in rows.iterrows():
        path = row.get(column)
        if isinstance(path, str) and path and Path(path).is_file():
            frames[row["key"]] = (row, pd.read_csv(path))
    by_set: dict[tuple, list] = {}
    for key, (row, frame) in frames.items():
        by_set.setdefault(tuple(sorted(frame["image_id"].astype(str))), []).append((row, frame))
    children = []
    for ids, members in by_set.items():
        order = members[0][1]["image_id"].astype(str).tolist()  # the ladder's own test order
        patients = members[0][1].set_index(members[0][1]["image_id"].astype(str)).loc[order, "patient_id"]
        seeds = [r.get("bootstrap_seed") for r, _ in members if pd.notna(r.get("bootstrap_seed"))]
        weights = resample_weights(patients.tolist(), n_boot, int(min(seeds)) if seeds else _seed_of(ids),
                                   None if draws is None else draws.get(ids))
        for row, frame in members:
            children.append(_child(row, frame.set_index(frame["image_id"].astype(str)).loc[order], ids, weights))
    return children


def _seed_of(ids: tuple) -> int:
    return zlib.crc32("\n".join(ids).encode())


def _child(row, frame: pd.DataFrame, ids: tuple, weights: np.ndarray) -> Child:
    y = frame["label"].to_numpy(int)
    if "score" in frame:
        scores = frame["score"].to_numpy(float)  # (N,)
    else:
        scores = frame[sorted((c for c in frame if c.startswith("score_")), key=lambda c: int(c[6:]))]
        scores = scores.to_numpy(float)  # (N, K)
    predicted = frame["predicted"].to_numpy(int) if "predicted" in frame else _argmax(scores)
    point = replicate_metrics(np.ones((1, len(y))), y, scores, predicted)
    return Child(key=row["key"], group=tuple(row[c] for c in GROUP), repeat=int(row["repeat"]),
                 seed=int(row["seed"]), test_set=ids, values=replicate_metrics(weights, y, scores, predicted),
                 point={name: float(v[0]) for name, v in point.items()})


def _argmax(scores: np.ndarray) -> np.ndarray:
    return (scores >= 0.5).astype(int) if scores.ndim == 1 else scores.argmax(axis=1)


def pooled(values: list[np.ndarray], alpha: float = 0.05) -> tuple[float, float, int]:
    """(low, high, replicates used) of the pooled replicate values; undefined replicates (NaN) left out."""
    flat = np.concatenate([np.asarray(v, float) for v in values]) if values else np.empty(0)
    flat = flat[np.isfinite(flat)]
    if not len(flat):
        return float("nan"), float("nan"), 0
    low, high = np.percentile(flat, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high), len(flat)


def group_rows(children: list[Child]) -> dict[tuple, dict]:
    """{group: {metric, metric_ci_low, metric_ci_high, runs, seeds, repeats, replicates}}."""
    out = {}
    for group in dict.fromkeys(c.group for c in children):
        mine = [c for c in children if c.group == group]
        row = {"runs": len(mine), "seeds": len({c.seed for c in mine}), "repeats": len({c.repeat for c in mine})}
        for name in mine[0].values:
            low, high, used = pooled([c.values[name] for c in mine])
            row.update({name: float(np.nanmean([c.point[name] for c in mine])), f"{name}_ci_low": low,
                        f"{name}_ci_high": high})
            if name == "auroc":
                row["replicates"] = used  # defined (all classes present) resamples, pooled
        out[group] = row
    return out


def paired_deltas(children: list[Child], ssl: tuple, other: tuple) -> dict[str, float]:
    """SSL - other arm on the same images and resamples: {delta_<m>, _ci_low, _ci_high, pairs}."""
    mine = [c for c in children if c.group == ssl]
    theirs = [c for c in children if c.group == other]
    diffs: dict[str, list] = {m: [] for m in DELTA_METRICS}
    points: dict[str, list] = {m: [] for m in DELTA_METRICS}
    for child in mine:
        partner = _partners(child, theirs)
        if not partner:
            continue
        for m in DELTA_METRICS:
            diffs[m].append(child.values[m] - np.mean([p.values[m] for p in partner], axis=0))
            points[m].append(child.point[m] - np.mean([p.point[m] for p in partner]))
    out = {"pairs": float(len(diffs["auroc"]))}
    for m in DELTA_METRICS:
        low, high, _ = pooled(diffs[m])
        out.update({f"delta_{m}": float(np.mean(points[m])) if points[m] else float("nan"),
                    f"delta_{m}_ci_low": low, f"delta_{m}_ci_high": high})
    return out


def _partners(child: Child, theirs: list[Child]) -> list[Child]:
    """The other arm's run of the same repeat and seed on the same images; else (an arm without seeds) all
    its runs on the same images."""
    same_images = [c for c in theirs if c.test_set == child.test_set]
    same_seed = [c for c in same_images if c.seed == child.seed]
    return same_seed or same_images


def comparisons(groups: list[tuple]) -> list[tuple[tuple, tuple]]:
    """(SSL group, other arm's group) pairs per site and rung: the other arm in the SSL row's protocol
    when it has one, else in its own (e.g. features, or scratch that only fine-tunes)."""
    pairs = []
    for ssl in (g for g in groups if g[3] == "ssl"):
        site, rung, protocol, _ = ssl
        others = [g for g in groups if g[:2] == (site, rung) and g[3] != "ssl"]
        for arm in dict.fromkeys(g[3] for g in others):
            candidates = [g for g in others if g[3] == arm]
            same = [g for g in candidates if g[2] == protocol]
            pairs.append((ssl, (same or candidates)[0]))
    return pairs

