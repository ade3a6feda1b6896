"""The linear-probe head: a converged, standardised logistic regression on frozen features.

A few AdamW epochs of an nn.Linear on raw pooled features scores mostly its random start (features have
wildly different scales, and a handful of labelled examples gives a handful of steps). scikit-learn's
LBFGS logistic regression on standardised features converges for every rung; its regularisation strength is
chosen on the validation split. The standardisation is folded into the head's weights, so the result is the
same `Classifier` (encoder + nn.Linear) the fine-tune protocol produces.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn

STRENGTHS = (0.01, 0.1, 1.0, 10.0)  # inverse L2 strengths tried; the best on validation is kept


def fit_probe_head(head: nn.Linear, x_train: np.ndarray, y_train: np.ndarray, n_classes: int, balanced: bool,
                   score_fn, seed: int) -> list[dict]:
    """Fit `head` in place; returns the validation history (one entry per strength tried; its "epoch" is the
    candidate's number, so the history logs like fine-tuning's).
    score_fn(head) -> (score, val dict) evaluates a candidate head on the validation split (higher = better)."""
    scaler = StandardScaler().fit(x_train)
    history, best = [], None
    for step, strength in enumerate(STRENGTHS, start=1):
        model = LogisticRegression(C=strength, max_iter=5000, class_weight="balanced" if balanced else None,
                                   random_state=seed).fit(scaler.transform(x_train), y_train)
        _load_folded(head, model, scaler, n_classes)
        score, val = score_fn(head)
        history.append({"epoch": step, "C": strength, "val_loss": val["loss"], "val_auroc": val["auroc"]})
        if best is None or score > best[0]:
            best = (score, {k: v.clone() for k, v in head.state_dict().items()})
    head.load_state_dict(best[1])
    return history


def _load_folded(head: nn.Linear, model: LogisticRegression, scaler: StandardScaler, n_classes: int) -> None:
    """w·(x − μ)/σ + b  ==  (w/σ)·x + (b − Σ w μ/σ), written into the head's K logits."""
    coef, intercept = model.coef_ / scaler.scale_, model.intercept_ - (model.coef_ * scaler.mean_ / scaler.scale_).sum(1)
    weight = np.zeros((n_classes, coef.shape[1]))
    bias = np.zeros(n_classes)
    if coef.shape[0] == 1:            # binary: softmax([0, z]) = sigmoid(z) on the positive logit
        weight[1], bias[1] = coef[0], intercept[0]
    else:
        weight[model.classes_], bias[model.classes_] = coef, intercept
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(weight, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))
