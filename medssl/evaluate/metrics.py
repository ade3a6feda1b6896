"""Diagnostic metrics for binary and multi-class classifiers (scikit-learn underneath).

Conventions used everywhere in medssl:
- binary scores are the predicted probability of the positive class (code 1); an image is called positive
  when `score >= threshold` (the same convention as `sklearn.metrics.roc_curve`);
- the threshold is chosen on the VALIDATION split (`choose_threshold`) and only applied to the test split;
- every value returned is a plain float so a metrics dict goes straight into MLflow and the results CSV;
  confusion matrices are flattened to `cm_<true>_<pred>` counts.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from sklearn import metrics as skm

from medssl.errors import DataError

ECE_BINS = 10  # equal-width probability bins; see expected_calibration_error


def choose_threshold(y_val, p_val, target_sensitivity: float | None = None) -> float:
    """Operating point from the validation split.

    Without a target: Youden's J (max sensitivity + specificity - 1; ties -> the highest threshold).
    With a target: the highest threshold whose sensitivity reaches the target, i.e. the most specific
    operating point that still finds the requested share of positives (lower thresholds only lose
    specificity). The threshold is always one of the observed validation scores.
    """
    y_val, p_val = _binary_inputs(y_val, p_val, "validation")
    fpr, tpr, thresholds = skm.roc_curve(y_val, p_val, drop_intermediate=False)
    finite = np.isfinite(thresholds)  # sklearn prepends +inf ("call nothing positive")
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if target_sensitivity is None:
        return float(thresholds[int(np.argmax(tpr - fpr))])
    reached = np.flatnonzero(tpr >= target_sensitivity - 1e-12)
    return float(thresholds[reached[0]])  # thresholds decrease, so the first hit is the highest


def sensitivity_at_specificity(y_true, p, specificity: float) -> float:
    """Best sensitivity over all thresholds whose specificity is at least `specificity`."""
    fpr, tpr, _ = skm.roc_curve(y_true, p, drop_intermediate=False)
    allowed = fpr <= 1.0 - specificity + 1e-12
    return float(tpr[allowed].max())


def expected_calibration_error(y_true, p, n_bins: int = ECE_BINS) -> float:
    """ECE of the positive-class probability with `n_bins` equal-width bins on [0, 1].

    Bin b holds scores in [b/n, (b+1)/n); the last bin also holds 1.0. ECE = sum over non-empty bins of
    (bin size / N) * |observed positive rate - mean score|.
    """
    y_true, p = np.asarray(y_true, float), np.asarray(p, float)
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in np.unique(bins):
        inside = bins == b
        ece += inside.mean() * abs(y_true[inside].mean() - p[inside].mean())
    return float(ece)


def binary_metrics(y_true, p, threshold: float) -> dict[str, float]:
    """All binary metrics at one operating point (`threshold` chosen on validation)."""
    y_true, p = _binary_inputs(y_true, p, "test")
    pred = (p >= threshold).astype(int)
    cm = skm.confusion_matrix(y_true, pred, labels=[0, 1])  # rows = truth, cols = prediction
    tn, fp, fn, tp = (int(v) for v in cm.ravel())
    out = {
        "auroc": skm.roc_auc_score(y_true, p),
        "auprc": skm.average_precision_score(y_true, p),
        "balanced_accuracy": skm.balanced_accuracy_score(y_true, pred),
        "sensitivity": tp / (tp + fn),
        "specificity": tn / (tn + fp),
        "sens_at_spec90": sensitivity_at_specificity(y_true, p, 0.90),
        "sens_at_spec95": sensitivity_at_specificity(y_true, p, 0.95),
        "f1": skm.f1_score(y_true, pred, zero_division=0),
        "brier": skm.brier_score_loss(y_true, p),
        "ece": expected_calibration_error(y_true, p),
        "threshold": threshold,
    }
    out.update(_flat_confusion(cm))
    return {key: float(value) for key, value in out.items()}


def resample_metrics(y_true, p, threshold: float) -> dict[str, float]:
    """The bootstrap's subset of `binary_metrics` (same values), in numpy: 1000 replicates in well under a
    second where the scikit-learn calls would take ~8 s. Ties count half (AUROC), as in scikit-learn."""
    y_true, p = np.asarray(y_true, int), np.asarray(p, float)
    pos = y_true == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    ranks = rankdata(p)  # average ranks for ties
    auroc = (ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    order = np.argsort(-p, kind="stable")
    last_of_tie = np.r_[np.flatnonzero(np.diff(p[order])), len(p) - 1]  # one point per distinct score
    tps = np.cumsum(y_true[order])[last_of_tie]
    precision, recall = tps / (last_of_tie + 1), tps / n_pos
    auprc = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    pred = p >= threshold
    tp, fn = int((pred & pos).sum()), int((~pred & pos).sum())
    fp, tn = int((pred & ~pos).sum()), int((~pred & ~pos).sum())
    sens, spec = tp / n_pos, tn / n_neg
    return {"auroc": float(auroc), "auprc": auprc, "balanced_accuracy": (sens + spec) / 2, "sensitivity": sens,
            "specificity": spec, "f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0}


def multiclass_metrics(y_true, probs) -> dict[str, float]:
    """Macro one-vs-rest AUROC, balanced accuracy, macro F1, multi-class Brier, confusion matrix.

    Brier here is Brier's original multi-class score: mean over images of sum_k (p_k - [y == k])^2
    (range 0..2; equals 2x the binary Brier score when K = 2). Prediction = argmax.
    """
    y_true, probs = np.asarray(y_true, int), np.asarray(probs, float)  # (N,), (N, K)
    n_classes = probs.shape[1]
    present = np.unique(y_true)
    if len(present) < n_classes:
        raise DataError(f"classes {sorted(set(range(n_classes)) - set(present))} have no example",
                        where="multi-class evaluation", fix="evaluate on a split that holds every class")
    pred = probs.argmax(axis=1)
    onehot = np.eye(n_classes)[y_true]  # (N, K)
    cm = skm.confusion_matrix(y_true, pred, labels=list(range(n_classes)))
    out = {
        "auroc": skm.roc_auc_score(y_true, probs, multi_class="ovr", average="macro"),
        "balanced_accuracy": skm.balanced_accuracy_score(y_true, pred),
        "f1": skm.f1_score(y_true, pred, average="macro", zero_division=0),
        "brier": float(((probs - onehot) ** 2).sum(axis=1).mean()),
    }
    out.update(_flat_confusion(cm))
    return {key: float(value) for key, value in out.items()}


def classification_metrics(y_true, y_score, threshold: float | None = None, groups=None,
                           n_boot: int = 0, seed: int = 0) -> dict[str, float]:
    """Point metrics, plus 95% patient-bootstrap CIs (`<name>_ci_low/_ci_high`) when groups and n_boot>0.

    `y_score`: (N,) positive-class probabilities or (N, K) class probabilities (K = 2 is binary). The
    intervals come from all replicates at once (bootstrap.bootstrap_intervals): no metric call per replicate.
    """
    from medssl.evaluate.bootstrap import BOOT_METRICS, bootstrap_intervals
    score = positive_scores(y_score)
    if score.ndim == 1:
        threshold = 0.5 if threshold is None else threshold
        out, predicted = binary_metrics(y_true, score, threshold), (score >= threshold).astype(int)
    else:
        out, predicted = multiclass_metrics(y_true, score), score.argmax(axis=1)
    if groups is not None and n_boot > 0:
        cis, skipped = bootstrap_intervals(y_true, score, predicted, groups, n_boot, seed)
        for name in BOOT_METRICS:
            if name in cis and name in out:
                out[f"{name}_ci_low"], out[f"{name}_ci_high"] = cis[name]
        out["boot_skipped"] = float(skipped)
    return out


def positive_scores(y_score) -> np.ndarray:
    """(N,) for binary problems (a (N, 2) input becomes its column 1), (N, K) otherwise."""
    score = np.asarray(y_score, float)
    if score.ndim == 2 and score.shape[1] == 2:
        return score[:, 1]
    return score


def confusion_from_metrics(values: dict) -> np.ndarray:
    """Rebuild the (K, K) confusion matrix from the flattened `cm_<true>_<pred>` entries."""
    k = int(round(np.sqrt(sum(1 for key in values if key.startswith("cm_")))))
    return np.array([[values[f"cm_{t}_{p}"] for p in range(k)] for t in range(k)], dtype=int)


def _flat_confusion(cm: np.ndarray) -> dict[str, int]:
    return {f"cm_{t}_{p}": int(cm[t, p]) for t in range(cm.shape[0]) for p in range(cm.shape[1])}


def _binary_inputs(y, p, split: str) -> tuple[np.ndarray, np.ndarray]:
    y, p = np.asarray(y, int), np.asarray(p, float)
    if y.shape != p.shape or y.ndim != 1:
        raise DataError(f"labels {y.shape} and scores {p.shape} differ in shape", where=f"{split} split")
    if len(np.unique(y)) < 2:
        raise DataError(f"the {split} split holds only class {int(y[0]) if len(y) else 'none'}",
                        where=f"{split} split", fix="AUROC and thresholds need positives and negatives: "
                        "use a larger split or a different split seed")
    return y, p
