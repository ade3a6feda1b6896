"""Cluster (patient-level) bootstrap confidence intervals and paired SSL-vs-other-arm differences.

Images of one patient are correlated, so resampling images would make intervals too narrow. Each
bootstrap replicate draws patients with replacement (as many as there are) and takes ALL images of every
drawn patient. A replicate in which a class is missing (AUROC undefined) is skipped and counted, never
silently filled in. The paired bootstrap evaluates both models on the SAME replicate, so the interval of
the difference reflects the difference, not the two models' separate sampling noise.

`resample_weights` gives all replicates at once as a (B, N) matrix of how often each image was drawn (the same
draws as `patient_resamples` for the same seed), which `medssl.evaluate.resampled` turns into metrics without a
per-replicate loop; `bootstrap_intervals` is that fast path for one model.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import pandas as pd

BOOT_METRICS = ("auroc", "auprc", "balanced_accuracy", "sensitivity", "specificity", "f1")
MetricFn = Callable[[np.ndarray, np.ndarray], dict]


def patient_resamples(groups, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Yield `n_boot` index arrays; each is the union of all images of patients drawn with replacement."""
    codes, uniques = pd.factorize(pd.Series(list(groups)))
    order = np.argsort(codes, kind="stable")
    counts = np.bincount(codes, minlength=len(uniques))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    members = [order[s:s + c] for s, c in zip(starts, counts)]  # image indices per patient
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        picked = rng.integers(0, len(members), size=len(members))
        yield np.concatenate([members[g] for g in picked])


def patient_draws(groups, n_boot: int, seed: int) -> np.ndarray:
    """(B, G) patient codes drawn with replacement (codes in order of first appearance in `groups`).
    One call draws the same numbers as `patient_resamples`' B calls of size G with the same seed."""
    n_patients = len(pd.unique(pd.Series(list(groups))))
    return np.random.default_rng(seed).integers(0, n_patients, size=(n_boot, n_patients))


def resample_weights(groups, n_boot: int, seed: int, draws: np.ndarray | None = None) -> np.ndarray:
    """(B, N): how many times each image is in each replicate (its patient's draw count). `draws`
    (B, G) overrides the random draws (tests, hand computations)."""
    codes, uniques = pd.factorize(pd.Series(list(groups)))
    draws = patient_draws(groups, n_boot, seed) if draws is None else np.asarray(draws, int)
    n_boot, n_patients = draws.shape[0], len(uniques)
    flat = (draws + n_patients * np.arange(n_boot)[:, None]).ravel()
    per_patient = np.bincount(flat, minlength=n_boot * n_patients).reshape(n_boot, n_patients)  # (B, G)
    return per_patient[:, codes].astype(float)  # (B, N)


def bootstrap_intervals(y_true, score, predicted, groups, n_boot: int, seed: int = 0,
                        alpha: float = 0.05) -> tuple[dict[str, tuple[float, float]], int]:
    """`bootstrap_ci` of every vectorised metric (resampled.VECTOR_METRICS), all replicates in one pass."""
    from medssl.evaluate.resampled import replicate_metrics
    values = replicate_metrics(resample_weights(groups, n_boot, seed), y_true, score, predicted)
    skipped = int(np.isnan(values["auroc"]).sum())
    return {name: _percentiles(v[np.isfinite(v)], alpha) for name, v in values.items()}, skipped


def bootstrap_ci(metric_fn: MetricFn, y_true, score, groups, n_boot: int, seed: int = 0,
                 names=BOOT_METRICS, alpha: float = 0.05) -> tuple[dict[str, tuple[float, float]], int]:
    """Percentile CIs of `metric_fn(y, score)[name]` over patient resamples -> ({name: (low, high)}, skipped)."""
    y_true, score = np.asarray(y_true), np.asarray(score)
    n_classes = len(np.unique(y_true))
    draws: dict[str, list[float]] = {}
    skipped = 0
    for idx in patient_resamples(groups, n_boot, seed):
        if len(np.unique(y_true[idx])) < n_classes:
            skipped += 1
            continue
        values = metric_fn(y_true[idx], score[idx])
        for name in names:
            if name in values:
                draws.setdefault(name, []).append(values[name])
    return {name: _percentiles(v, alpha) for name, v in draws.items()}, skipped


def paired_bootstrap(metric_fn: MetricFn, y_true, score_a, score_b, groups, n_boot: int, seed: int = 0,
                     names=("auroc",), alpha: float = 0.05) -> tuple[dict[str, tuple[float, float, float]], int]:
    """Difference A - B (e.g. SSL - scratch) on the same images and the same patient resamples.

    Returns ({name: (observed difference, ci_low, ci_high)}, skipped replicates).
    """
    y_true, score_a, score_b = np.asarray(y_true), np.asarray(score_a), np.asarray(score_b)
    n_classes = len(np.unique(y_true))
    observed_a, observed_b = metric_fn(y_true, score_a), metric_fn(y_true, score_b)
    draws: dict[str, list[float]] = {name: [] for name in names}
    skipped = 0
    for idx in patient_resamples(groups, n_boot, seed):
        if len(np.unique(y_true[idx])) < n_classes:
            skipped += 1
            continue
        a, b = metric_fn(y_true[idx], score_a[idx]), metric_fn(y_true[idx], score_b[idx])
        for name in names:
            draws[name].append(a[name] - b[name])
    out = {}
    for name in names:
        low, high = _percentiles(draws[name], alpha)
        out[name] = (float(observed_a[name] - observed_b[name]), low, high)
    return out, skipped


def _percentiles(values, alpha: float) -> tuple[float, float]:
    if not len(values):  # every replicate lacked a class: no interval, say so with NaN
        return float("nan"), float("nan")
    low, high = np.percentile(np.asarray(values, float), [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def paired_intervals(y_true, score_a, predicted_a, score_b, predicted_b, groups, n_boot: int, seed: int = 0,
                     names=("auroc",), alpha: float = 0.05) -> tuple[dict[str, tuple[float, float, float]], int]:
    """`paired_bootstrap` (A - B on the same patient resamples) with all replicates at once: no metric call per
    replicate. Returns ({name: (observed difference, ci_low, ci_high)}, skipped replicates)."""
    from medssl.evaluate.resampled import replicate_metrics
    weights = resample_weights(groups, n_boot, seed)  # (B, N), shared by both models: the pairing
    ones = np.ones((1, weights.shape[1]))  # the observed data as one "replicate"
    a, b = (replicate_metrics(weights, y_true, s, p) for s, p in ((score_a, predicted_a), (score_b, predicted_b)))
    point_a, point_b = (replicate_metrics(ones, y_true, s, p)
                        for s, p in ((score_a, predicted_a), (score_b, predicted_b)))
    out = {}
    for name in names:
        diff = a[name] - b[name]
        out[name] = (float(point_a[name][0] - point_b[name][0]), *_percentiles(diff[np.isfinite(diff)], alpha))
    return out, int(np.isnan(a["auroc"]).sum())
