"""Wall time of the report of a 7-class ladder of 36 runs, against the per-replicate scikit-learn path.

    python benchmarks/bench_report.py [--classes 7] [--test-images 300] [--patients 150] [--n-boot 1000]
                                      [--out benchmarks/results/bench_report.json]

The ladder: 3 rungs x 3 seeds x 2 protocols x {ssl, scratch} = 36 runs on one test split (the layout behind
the 269 s figure in issue 10), each with a prediction file of `--test-images` images from `--patients`
patients (class probabilities from a Dirichlet with a class signal), as the ladder writes them. Measured:
  1. build_report: pooled intervals for every cell, paired deltas vs every arm, tables, curve, verdicts;
  2. one run's patient-bootstrap intervals (metrics.classification_metrics, what each ladder child computes);
  3. the baseline in the same run: the per-replicate scikit-learn path the report used before (one
     multiclass_metrics call per replicate per run: cells x seeds x B for the intervals plus 2 x SSL cells x
     seeds x B for the deltas), timed on `--baseline-calls` calls and scaled to the ladder's count.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console

from medssl.evaluate.metrics import classification_metrics, multiclass_metrics
from medssl.evaluate.report import build_report


def make_ladder(folder: Path, n_classes: int, n_images: int, n_patients: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    patients = [f"pat-{i % n_patients:04d}" for i in range(n_images)]
    labels = np.arange(n_images) % n_classes
    rows = []
    for (rung, n), run_seed, protocol, arm in itertools.product([("per_class_5", 5), ("per_class_10", 10),
                                                                 ("per_class_25", 25)], range(3),
                                                                ["linear", "finetune"], ["ssl", "scratch"]):
        signal = (2.0 if arm == "ssl" else 1.0) * np.log(n)
        alpha = np.ones((n_images, n_classes)) + signal * np.eye(n_classes)[labels] * rng.random((n_images, 1))
        probs = np.stack([rng.dirichlet(a) for a in alpha])  # (N, K)
        key = f"r0/{rung}/seed{run_seed}/{arm}/{protocol}"
        frame = pd.DataFrame({"image_id": [f"img-{i:05d}" for i in range(n_images)], "label": labels,
                              "patient_id": patients})
        for k in range(n_classes):
            frame[f"score_{k}"] = probs[:, k]
        frame["predicted"] = probs.argmax(axis=1)
        path = folder / f"{key.replace('/', '__')}.csv"
        frame.to_csv(path, index=False)
        rows.append({"key": key, "repeat": 0, "rung": rung, "seed": run_seed, "arm": arm, "protocol": protocol,
                     "n_labelled": n * n_classes, "status": "ok", "predictions": str(path),
                     "bootstrap_seed": run_seed, "bootstrap_n": 1000})
    return pd.DataFrame(rows)


def per_replicate_seconds(frame: pd.DataFrame, calls: int) -> float:
    """Seconds per scikit-learn multi-class metric call on one resample (the old report's inner step)."""
    y = frame["label"].to_numpy(int)
    probs = frame[[c for c in frame if c.startswith("score_")]].to_numpy(float)
    rng = np.random.default_rng(0)
    draws = [rng.integers(0, len(y), len(y)) for _ in range(calls)]
    t0 = time.perf_counter()
    for idx in draws:
        if len(np.unique(y[idx])) == probs.shape[1]:
            multiclass_metrics(y[idx], probs[idx])
    return (time.perf_counter() - t0) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=7)
    parser.add_argument("--test-images", type=int, default=300)
    parser.add_argument("--patients", type=int, default=150)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--baseline-calls", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_report.json"))
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory(prefix="bench_report_") as tmp:
        results = make_ladder(Path(tmp), args.classes, args.test_images, args.patients)
        quiet = Console(file=open(os.devnull, "w"), width=160)
        t0 = time.perf_counter()
        build_report(results, Path(tmp) / "report", console=quiet, n_boot=args.n_boot)
        report_s = time.perf_counter() - t0
        frame = pd.read_csv(results["predictions"].iloc[0])
        probs = frame[[c for c in frame if c.startswith("score_")]].to_numpy(float)
        t0 = time.perf_counter()
        classification_metrics(frame["label"], probs, groups=frame["patient_id"], n_boot=args.n_boot, seed=0)
        one_run_s = time.perf_counter() - t0
        per_call = per_replicate_seconds(frame, args.baseline_calls)
    cells, ssl_cells, seeds = 12, 6, 3
    old_calls = (cells * seeds + 2 * ssl_cells * seeds) * args.n_boot
    out = {"classes": args.classes, "runs": len(results), "test_images": args.test_images,
           "test_patients": args.patients, "n_boot": args.n_boot, "cpu_count": os.cpu_count(),
           "machine": "2-core CPU shared with other helpers" if os.cpu_count() == 2 else f"{os.cpu_count()} CPUs",
           "seconds": {"build_report (new, measured)": report_s,
                       "one run's bootstrap intervals (new, measured)": one_run_s,
                       "per-replicate scikit-learn call (old inner step, measured)": per_call,
                       "old report, per-replicate path (scaled)": per_call * old_calls,
                       "one run's bootstrap intervals, per-replicate path (scaled)": per_call * args.n_boot},
           "old_report_calls": old_calls, "goal_s": 10.0}
    out["speedup_report"] = out["seconds"]["old report, per-replicate path (scaled)"] / report_s
    for name, value in out["seconds"].items():
        console.print(f"{name:62s} {value:10.4f} s")
    verdict = "met" if report_s <= out["goal_s"] else "MISSED"
    console.print(f"report speed-up {out['speedup_report']:.0f}x; goal <= {out['goal_s']:.0f} s: {verdict}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    console.print(f"written {args.out}")


if __name__ == "__main__":
    main()
