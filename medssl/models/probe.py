"""The logistic probe on frozen features: a converged, standardised logistic regression, written once.

Two users: the online probe of pretraining (train/probe.py: "is the encoder learning?", class probabilities of
held-out embeddings) and the ladder's linear protocol (ladder/classifier.py: the strength chosen on validation,
the fit folded into the Classifier's nn.Linear head). A few AdamW epochs of an nn.Linear on raw pooled features
would score mostly its random start (features have wildly different scales, and a handful of labelled examples
gives a handful of steps); scikit-learn's LBFGS on standardised features converges at every rung. Folding the
standardisation into the head's weights keeps the ladder's result the same `Classifier` (encoder + nn.Linear)
that fine-tuning produces, saved and scored by one code path.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

STRENGTHS = (0.01, 0.1, 1.0, 10.0)  # inverse L2 strengths the linear protocol tries; the best on validation wins


def fit_logistic(x: np.ndarray, y: np.ndarray, strength: float = 1.0, balanced: bool = False,
                 seed: int = 0) -> Pipeline:
    """StandardScaler + L2 logistic regression (LBFGS, inverse strength `strength`) fitted on x (N, F), y (N,)."""
    model = make_pipeline(StandardScaler(), LogisticRegression(
        C=strength, max_iter=5000, class_weight="balanced" if balanced else None, random_state=seed))
    with warnings.catch_warnings():  # a tiny, separable subset may stop at max_iter: its fit is still usable
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(x, y)


def logistic_proba(x_train: np.ndarray, y_train: np.ndarray, query: np.ndarray, seed: int = 0) -> np.ndarray:
    """(n_query, max(y_train) + 1) class probabilities of `query` (classes absent from y_train get 0)."""
    model = fit_logistic(x_train, y_train, seed=seed)
    proba = np.zeros((len(query), int(y_train.max()) + 1))
    proba[:, model.classes_] = model.predict_proba(query)
    return proba


def class_logits(logreg, coef: np.ndarray, intercept: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(K, F) weights and (K,) biases whose softmax is the fitted LogisticRegression's predict_proba, from its
    (or its folded) coef (1 or K', F) and intercept: rows by class code. Binary: softmax([0, z]) = sigmoid(z),
    z on the second class's logit. Classes absent from the fit keep a 0 logit (check_labels puts every class
    in every rung, so none is absent in the ladder)."""
    weight, bias = np.zeros((n_classes, coef.shape[1])), np.zeros(n_classes)
    if coef.shape[0] == 1:
        weight[logreg.classes_[1]], bias[logreg.classes_[1]] = coef[0], intercept[0]
    else:
        weight[logreg.classes_], bias[logreg.classes_] = coef, intercept
    return weight, bias


def load_folded(head: nn.Linear, model: Pipeline, n_classes: int) -> None:
    """Write a fitted `fit_logistic` pipeline into the head's K logits, standardisation included:
    w·(x − μ)/σ + b  ==  (w/σ)·x + (b − Σ w μ/σ)."""
    scaler, logreg = model[0], model[-1]
    coef = logreg.coef_ / scaler.scale_
    intercept = logreg.intercept_ - (logreg.coef_ * scaler.mean_ / scaler.scale_).sum(1)
    weight, bias = class_logits(logreg, coef, intercept, n_classes)
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(weight, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))


def fit_probe_head(head: nn.Linear, x_train: np.ndarray, y_train: np.ndarray, n_classes: int, balanced: bool,
                   score_fn, seed: int) -> list[dict]:
    """Fit `head` in place, one `fit_logistic` per strength in STRENGTHS, keeping the best by score_fn(head) ->
    (score, val dict) (higher = better; it scores a candidate on the validation split). Returns the validation
    history, one entry per strength (its "epoch" is the candidate's number, so it logs like fine-tuning's)."""
    history, best = [], None
    for step, strength in enumerate(STRENGTHS, start=1):
        load_folded(head, fit_logistic(x_train, y_train, strength, balanced, seed), n_classes)
        score, val = score_fn(head)
        history.append({"epoch": step, "C": strength, "val_loss": val["loss"], "val_auroc": val["auroc"]})
        if best is None or score > best[0]:
            best = (score, {k: v.clone() for k, v in head.state_dict().items()})
    head.load_state_dict(best[1])
    return history
