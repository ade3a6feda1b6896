"""Classification metrics for every bootstrap replicate at once: a (B, N) weight matrix, no Python loop.

A replicate of a patient bootstrap is a multiset of images, so it is fully described by how many times each
image was drawn: row b of `weights` (B, N). Every metric below is the scikit-learn metric of the expanded
replicate (`np.repeat(images, weights[b])`), computed for all rows together:
- AUROC is Mann-Whitney's U with ties counted half: for each positive image, the replicate's negative weight
  strictly below its score plus half the tied weight (one cumulative sum over the sorted negatives).
  K > 2 classes: one-vs-rest per class, macro mean (scikit-learn's `multi_class="ovr", average="macro"`);
- average precision (AUPRC) from cumulative positive / negative weights at the distinct scores, descending;
- balanced accuracy, sensitivity, specificity, F1 (macro for K > 2), Brier from weighted confusion counts.
A replicate that lacks one of the classes present in the full set gets NaN for every metric (undefined
AUROC; callers skip and count such replicates, never fill them in). The all-ones row is the point value.
"""
from __future__ import annotations

import numpy as np

VECTOR_METRICS = ("auroc", "auprc", "balanced_accuracy", "sensitivity", "specificity", "f1", "brier")


def replicate_metrics(weights: np.ndarray, y, scores, predicted) -> dict[str, np.ndarray]:
    """{metric: (B,)} for labels y (N,), scores (N,) positive-class probability or (N, K) class
    probabilities, and the predicted class of every image (N,) (the model's own threshold / argmax)."""
    weights = np.atleast_2d(np.asarray(weights, float))  # (B, N)
    y, scores, predicted = np.asarray(y, int), np.asarray(scores, float), np.asarray(predicted, int)
    n_classes = 2 if scores.ndim == 1 else scores.shape[1]
    onehot = np.eye(n_classes)[y]  # (N, K)
    per_class = class_sums(weights, y, n_classes)  # (B, K) weight of each class in each replicate
    present = np.bincount(y, minlength=n_classes) > 0
    valid = (per_class[:, present] > 0).all(axis=1)  # (B,)
    out = {"auroc": _auroc(weights, y, scores), **_confusion_metrics(weights, y, predicted, per_class)}
    if scores.ndim == 1:
        out["auprc"] = average_precision(weights, y == 1, scores)
        loss = (scores - y) ** 2  # (N,)
    else:
        loss = ((scores - onehot) ** 2).sum(axis=1)  # Brier's multi-class score, as multiclass_metrics
    out["brier"] = (weights * loss).sum(axis=1) / weights.sum(axis=1)
    return {name: np.where(valid, value, np.nan) for name, value in out.items()}


def class_sums(weights: np.ndarray, codes: np.ndarray, n_classes: int) -> np.ndarray:
    """(B, K): replicate weight of the images of each code. Column sums, not a BLAS product: (B, N) @ (N, K)
    is memory-bound, and BLAS threads on a shared CPU made it 100x slower than this."""
    return np.stack([weights[:, codes == k].sum(axis=1) for k in range(n_classes)], axis=1)


def binary_auroc(weights: np.ndarray, positive: np.ndarray, score: np.ndarray) -> np.ndarray:
    """(B,) Mann-Whitney AUROC of `score` for the boolean `positive` (N,), ties counted half: for every
    positive image, the replicate's negative weight strictly below its score plus half the tied weight,
    read off one cumulative sum over the negatives sorted by score (binary search for the tie bounds)."""
    negative = ~positive
    order = np.argsort(score[negative], kind="stable")
    sorted_neg = score[negative][order]  # (n_neg,)
    cum = np.zeros((weights.shape[0], len(sorted_neg) + 1))
    np.cumsum(weights[:, negative][:, order], axis=1, out=cum[:, 1:])  # (B, n_neg + 1)
    low = np.searchsorted(sorted_neg, score[positive], "left")  # negatives strictly below each positive
    high = np.searchsorted(sorted_neg, score[positive], "right")  # ... plus the tied ones
    w_pos = weights[:, positive]  # (B, n_pos)
    wins = (w_pos * (cum[:, low] + 0.5 * (cum[:, high] - cum[:, low]))).sum(axis=1)
    pairs = w_pos.sum(axis=1) * cum[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / pairs, np.nan)


def average_precision(weights: np.ndarray, positive: np.ndarray, score: np.ndarray) -> np.ndarray:
    """(B,) scikit-learn's average precision: sum over distinct thresholds of delta-recall x precision."""
    pos_level, neg_level = _level_sums(weights, positive, score, descending=True)  # (B, U)
    true_pos, called = np.cumsum(pos_level, axis=1), np.cumsum(pos_level + neg_level, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(called > 0, true_pos / np.where(called > 0, called, 1), 0.0)
        total = pos_level.sum(axis=1)
        return np.where(total > 0, (pos_level * precision).sum(axis=1) / total, np.nan)


def _auroc(weights, y, scores) -> np.ndarray:
    if scores.ndim == 1:
        return binary_auroc(weights, y == 1, scores)
    per_class = [binary_auroc(weights, y == k, scores[:, k]) for k in range(scores.shape[1])]
    return np.mean(per_class, axis=0)  # macro one-vs-rest; NaN when a class is missing from the replicate


def _level_sums(weights, positive, score, descending: bool) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative weight per distinct score, levels in score order: (B, U) each."""
    order = np.argsort(-score if descending else score, kind="stable")
    ordered = score[order]
    starts = np.r_[0, np.flatnonzero(np.diff(ordered)) + 1]  # first image of each distinct score
    w = weights[:, order]  # (B, N)
    is_pos = positive[order].astype(float)
    pos, neg = w * is_pos, w * (1 - is_pos)
    if len(starts) == len(score):  # no tied scores (the usual case): every image is its own level
        return pos, neg
    return np.add.reduceat(pos, starts, axis=1), np.add.reduceat(neg, starts, axis=1)


def _confusion_metrics(weights, y, predicted, per_class) -> dict[str, np.ndarray]:
    """Balanced accuracy, F1 and (binary) sensitivity / specificity from weighted confusion counts."""
    n_classes = per_class.shape[1]
    predicted = np.clip(predicted, 0, n_classes - 1)
    true_pos = class_sums(weights, np.where(predicted == y, y, -1), n_classes)  # (B, K)
    false_pos = class_sums(weights, predicted, n_classes) - true_pos
    false_neg = per_class - true_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = true_pos / per_class
        f1 = np.where(true_pos > 0, 2 * true_pos / (2 * true_pos + false_pos + false_neg), 0.0)
    present = np.bincount(y, minlength=n_classes) > 0  # scikit-learn averages over the classes of y_true
    out = {"balanced_accuracy": recall[:, present].mean(axis=1)}
    if n_classes == 2:
        out.update(sensitivity=recall[:, 1], specificity=recall[:, 0], f1=f1[:, 1])
    else:
        out["f1"] = f1.mean(axis=1)
    return out
