"""Label efficiency across sites: does a recipe's frozen encoder beat engineered features, a random encoder and
the MONAI tutorial's recipe at 5, 10 and 25 labels per class, on the internal test subjects AND on another site?

    PYTHONPATH=$PWD python3 benchmarks/bench_label_efficiency.py --minutes 2      # 2 CPU-minutes per recipe
    PYTHONPATH=$PWD python3 benchmarks/bench_label_efficiency.py --minutes 10     # the issue's full figure
    PYTHONPATH=$PWD python3 benchmarks/bench_label_efficiency.py --small          # a quick check, no figure

Tasks (label_efficiency_tasks.py): "lesion" (whole 32^3 volumes, healthy vs lesion; ITK T1 subjects, external:
MNI152 subjects) and "tissue" (32^3 patches, CSF / grey / white matter at the centre; ITK T1 k-means
segmentation, external: MNI152 tissue maps). Every recipe pretrains once, for the same time budget, on both
tasks' unlabelled internal training images; its frozen encoder is then probed on every task.

Protocol per task, rung k (labelled patients per class) and seed: k labelled images per class drawn from
distinct training-pool subjects; the logistic probe's strength chosen by stratified 3-fold cross-validation
inside those labels only (medssl.models.probe.STRENGTHS); scored on every internal test and external image.
Intervals: 95% percentile bootstrap that resamples test subjects (all their images) AND seeds, 1,000 replicates;
deltas vs engineered features are paired (same replicates). Results: benchmarks/results/label_efficiency.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold

sys.path.insert(0, str(Path(__file__).parent))
from label_efficiency_recipes import (RECIPES, SLICE_RECIPES, engineered_features, medssl_recipe,  # noqa: E402
                                      random_encoder, slice_recipe, tutorial_recipe)
from label_efficiency_tasks import build_tasks  # noqa: E402

from medssl.evaluate.bootstrap import resample_weights  # noqa: E402
from medssl.evaluate.resampled import replicate_metrics  # noqa: E402
from medssl.models.probe import STRENGTHS, fit_logistic  # noqa: E402
from medssl.train.probe import embed  # noqa: E402

RUNGS = (5, 10, 25)
RESULTS = Path(__file__).parent / "results"


def draw_labels(pool, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of k images per class, each from a different subject (where the pool has that many)."""
    chosen = []
    for c in np.unique(pool.labels):
        idx = np.flatnonzero(pool.labels == c)
        subjects = rng.permutation(np.unique(pool.patients[idx]))[:k]
        for s in subjects:
            chosen.append(rng.choice(idx[pool.patients[idx] == s]))
    return np.array(chosen)


def choose_strength(x: np.ndarray, y: np.ndarray, seed: int) -> float:
    """The inverse L2 strength with the best 3-fold balanced accuracy inside the labelled set (ties: stronger)."""
    folds = StratifiedKFold(n_splits=min(3, int(np.bincount(y).min())), shuffle=True, random_state=seed)
    best, best_score = STRENGTHS[0], -1.0
    for strength in STRENGTHS:
        scores = [balanced_accuracy_score(y[te], fit_logistic(x[tr], y[tr], strength, seed=seed).predict(x[te]))
                  for tr, te in folds.split(x, y)]
        if np.mean(scores) > best_score + 1e-9:
            best, best_score = strength, float(np.mean(scores))
    return best


def probe_runs(feats: dict[str, np.ndarray], task, k: int, seeds: int) -> dict[str, list[np.ndarray]]:
    """Per evaluation set, one (N, K) probability array per seed."""
    out = {"internal": [], "external": []}
    for seed in range(seeds):
        rng = np.random.default_rng([seed, k])
        labelled = draw_labels(task.pool, k, rng)
        x, y = feats["pool"][labelled], task.pool.labels[labelled]
        model = fit_logistic(x, y, choose_strength(x, y, seed), seed=seed)
        for site in out:
            proba = np.zeros((len(feats[site]), len(task.classes)))
            proba[:, model.classes_] = model.predict_proba(feats[site])
            out[site].append(proba)
    return out


def replicates(split, probas: list[np.ndarray], n_boot: int) -> dict[str, np.ndarray]:
    """{metric: (B,)} each replicate resampling test subjects and seeds (the same draws for every recipe)."""
    weights = resample_weights(split.patients, n_boot, seed=0)  # (B, N)
    seed_draws = np.random.default_rng(1).integers(0, len(probas), size=(n_boot, len(probas)))  # (B, S)
    per_seed = []
    for proba in probas:
        score = proba[:, 1] if proba.shape[1] == 2 else proba
        per_seed.append(replicate_metrics(weights, split.labels, score, proba.argmax(1)))
    out = {}
    for metric in ("balanced_accuracy", "auroc"):
        values = np.stack([m[metric] for m in per_seed])  # (S, B)
        out[metric] = np.nanmean(values[seed_draws, np.arange(n_boot)[:, None]], axis=1)  # (B,)
        out[metric + "_point"] = float(np.mean([replicate_metrics(np.ones((1, len(split.labels))), split.labels,
                                                 p[:, 1] if p.shape[1] == 2 else p, p.argmax(1))[metric][0]
                                                 for p in probas]))
    return out


def features_of(encoder, tasks) -> dict[str, dict[str, np.ndarray]]:
    return {t.name: {site: embed(encoder, torch.from_numpy(getattr(t, "pool" if site == "pool" else
                                                                   "test" if site == "internal" else site).images),
                                 torch.device("cpu"))
                     for site in ("pool", "internal", "external")} for t in tasks}


def split_of(task, site: str):
    return task.test if site == "internal" else task.external


def evaluate(name: str, feats, tasks, seeds: int, n_boot: int) -> dict:
    rows = {}
    for task in tasks:
        for k in RUNGS:
            runs = probe_runs(feats[task.name], task, k, seeds)
            for site, probas in runs.items():
                rows[(task.name, k, site)] = replicates(split_of(task, site), probas, n_boot)
    return rows


def summarise(all_rows: dict, meta: dict) -> dict:
    """Point values, intervals and paired deltas vs engineered features, JSON-ready."""
    table = []
    for recipe, rows in all_rows.items():
        for (task, k, site), reps in rows.items():
            base = all_rows["features"][(task, k, site)]
            row = {"recipe": recipe, "task": task, "k": k, "site": site, **meta.get(recipe, {})}
            for metric in ("balanced_accuracy", "auroc"):
                lo, hi = np.nanpercentile(reps[metric], [2.5, 97.5])
                delta = reps[metric] - base[metric]
                dlo, dhi = np.nanpercentile(delta, [2.5, 97.5])
                row[metric] = [round(reps[metric + "_point"], 3), round(float(lo), 3), round(float(hi), 3)]
                row[metric + "_vs_features"] = [round(reps[metric + "_point"] - base[metric + "_point"], 3),
                                                round(float(dlo), 3), round(float(dhi), 3)]
            table.append(row)
    return {"rows": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=2.0, help="pretraining budget per recipe")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--boot", type=int, default=1000)
    parser.add_argument("--recipes", default=",".join([*RECIPES, "tutorial"]),
                        help=f"comma-separated; also: {', '.join(SLICE_RECIPES)} (2D encoder, slice-pooled)")
    parser.add_argument("--small", action="store_true", help="tiny sets and budget: checks the code runs")
    parser.add_argument("--out", type=Path, default=RESULTS / "label_efficiency.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start, load_at_start = time.perf_counter(), os.getloadavg()[0]   # the budget is wall time: say how busy
    tasks = build_tasks(small=args.small)
    minutes = 0.05 if args.small else args.minutes
    volumes = [v for t in tasks for v in t.unlabelled]
    print(f"tasks built in {time.perf_counter() - start:.0f} s: " + ", ".join(
        f"{t.name} pool {len(t.pool.labels)} / test {len(t.test.labels)} / external {len(t.external.labels)}"
        for t in tasks), flush=True)
    feats = {"features": {t.name: {"pool": engineered_features(t.pool.images),
                                   "internal": engineered_features(t.test.images),
                                   "external": engineered_features(t.external.images)} for t in tasks},
             "random init": features_of(random_encoder(), tasks)}
    meta = {"features": {"steps": 0}, "random init": {"steps": 0}}
    for name in args.recipes.split(","):
        t0 = time.perf_counter()
        if name == "tutorial":
            encoder, info = tutorial_recipe(volumes, minutes)
        elif name in SLICE_RECIPES:  # a 2D encoder scoring the volumes from all their axial slices
            encoder, info = slice_recipe(name, volumes, minutes)
        else:
            encoder, info = medssl_recipe(name, volumes, minutes)
        feats[name], meta[name] = features_of(encoder, tasks), info
        print(f"{name}: {info['steps']} steps in {info['elapsed_s']} s ({time.perf_counter() - t0:.0f} s with "
              f"embedding)", flush=True)
    all_rows = {name: evaluate(name, f, tasks, args.seeds, args.boot) for name, f in feats.items()}
    result = summarise(all_rows, meta)
    result["settings"] = {"minutes": minutes, "seeds": args.seeds, "boot": args.boot, "small": args.small,
                          "wall_s": round(time.perf_counter() - start), "torch_threads": 2,
                          "machine": f"{os.cpu_count()}-core CPU, load average {load_at_start:.1f} at the start "
                                     f"and {os.getloadavg()[0]:.1f} at the end (1 = one busy core)"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    from label_efficiency_table import write_table
    write_table(result, args.out.with_suffix(".md"))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
