"""Choices made inside a rung's own labelled patients: folds, the epochs of fine-tuning, the probe's C, the threshold.

A rung's run may use its labelled patients only. Everything that must be chosen is chosen by stratified K-fold
cross-validation over the rung's PATIENTS (a patient's images never straddle a fold boundary):
- fine-tuning: the folds train in lockstep from the same initial weights with the run's schedule, early-stopped
  on the MEAN held-out curve (`patience`); the chosen epoch is that curve's best, and the run's model is the
  ENSEMBLE of the K fold models at that epoch (mean probability, models/ensemble.py). No refit: a model
  refitted on the whole rung trains for other steps and lands on another score scale, so a threshold chosen
  out of fold would not transfer to it (on the demo it called every test image one class: bal. acc. .50);
- the linear probe (frozen or engineered features): C is the best of STRENGTHS by the out-of-fold score, then a
  refit on the whole rung (a converged, regularised logistic regression changes little with 3/2 the data);
- the binary threshold comes from the out-of-fold predictions of the chosen setting (every rung patient
  is predicted once, by a model that did not train on it: for fine-tuning, by the ensemble's own members).
The legacy `finetune.validation: split` is the same code with one "fold": train = the rung, held out = the
validation split, and the fold's own model kept (no refit), as before inner validation existed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score
from sklearn.model_selection import StratifiedKFold

from medssl.errors import DataError
from medssl.evaluate.metrics import choose_threshold, positive_scores
from medssl.models.probe import STRENGTHS, fit_logistic  # the one logistic probe (its strengths, chosen per rung)


@dataclass
class Folds:
    """(train indices, held-out indices) per fold, into one dataset; `refit`: indices of a probe's final fit (the
    whole rung; fine-tuning keeps its fold models instead), or None to keep the single fold's model
    (validation: split)."""
    splits: list[tuple[np.ndarray, np.ndarray]]
    refit: np.ndarray | None
    held_out: np.ndarray = field(init=False)   # every index predicted out of fold, in fold order

    def __post_init__(self):
        self.held_out = np.concatenate([va for _, va in self.splits])


def patient_folds(patients, y, k: int, seed: int, rung: str, class_names=None) -> Folds:
    """Stratified K folds over the patients of one rung (their stratum: rarest class among their images).
    A class with fewer than k patients is a DataError naming the rung and the class."""
    patients, y = np.asarray(patients, object), np.asarray(y, int)
    frequency = np.bincount(y)
    frame = sorted({(p, c) for p, c in zip(patients, y)}, key=lambda pc: (pc[0], frequency[pc[1]], pc[1]))
    stratum = {}
    for p, c in frame:
        stratum.setdefault(p, c)   # first = rarest class of the patient
    ids = np.array(sorted(stratum), object)
    strata = np.array([stratum[p] for p in ids], int)
    names = class_names or {}
    for c in np.unique(y):
        n = int((strata == c).sum())
        if n < k:
            shown = f"{c} ({names[c]})" if c in names else str(c)
            raise DataError(f"rung {rung} has {n} labelled patient(s) of class {shown}, but inner validation with "
                            f"{k} folds needs at least {k} of every class", where=f"rung {rung}, class {shown}",
                            fix="use a larger rung, fewer folds (finetune.inner_folds, at least 2) or, spending "
                                "extra labels, finetune.validation: split")
    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(ids, strata)
    splits = []
    for _, held in folds:
        out = np.isin(patients, ids[held])
        splits.append((np.flatnonzero(~out), np.flatnonzero(out)))
    return Folds(splits, np.arange(len(y)))


def split_folds(n_train: int, n_val: int) -> Folds:
    """validation: split: items [0, n_train) are the rung, [n_train, n_train + n_val) the validation split."""
    return Folds([(np.arange(n_train), np.arange(n_train, n_train + n_val))], None)


def threshold_of(y, probs, target_sensitivity) -> float:
    """The binary operating point on out-of-fold (or validation) predictions; NaN for multi-class."""
    scores = positive_scores(probs)
    if scores.ndim == 2:
        return float("nan")
    return choose_threshold(y, scores, target_sensitivity)


# ---------------------------------------------------------------------------------------- the probe
@dataclass
class ProbeFit:
    model: object               # sklearn pipeline (standardise, logistic regression), fitted on the refit set
    C: float
    threshold: float
    val_loss: float
    val_auroc: float
    history: list[dict]


def proba(model, x: np.ndarray, n_classes: int) -> np.ndarray:
    """(N, K) class probabilities, columns by class code even if a class was absent from the fit."""
    out = np.zeros((len(x), n_classes))
    out[:, model.classes_] = model.predict_proba(x)
    return out


def fit_probe(x: np.ndarray, y, folds: Folds, n_classes: int, balanced: bool, monitor: str, seed: int,
              weights: np.ndarray, target_sensitivity=None) -> ProbeFit:
    """C by the out-of-fold score, threshold from the out-of-fold predictions, refit on `folds.refit`.
    x: (N, F) features of the rung (and, for validation: split, the validation images after them)."""
    y = np.asarray(y, int)
    held = folds.held_out
    best, history = None, []
    for step, C in enumerate(STRENGTHS, start=1):
        oof = np.zeros((len(y), n_classes))
        for tr, va in folds.splits:
            oof[va] = proba(fit_logistic(x[tr], y[tr], C, balanced, seed), x[va], n_classes)
        loss, auroc = held_out_scores(y[held], oof[held], weights)
        history.append({"epoch": step, "C": C, "val_loss": loss, "val_auroc": auroc})
        score = -loss if monitor == "val_loss" else auroc
        if best is None or score > best[0]:
            best = (score, C, oof, loss, auroc)
    _, C, oof, loss, auroc = best
    refit = folds.refit if folds.refit is not None else folds.splits[0][0]
    model = fit_logistic(x[refit], y[refit], C, balanced, seed)
    return ProbeFit(model, C, threshold_of(y[held], oof[held], target_sensitivity), loss, auroc, history)


def held_out_scores(y, probs, weights: np.ndarray) -> tuple[float, float]:
    """(class-weighted cross-entropy, AUROC) of held-out predictions; AUROC NaN when a class is missing."""
    y = np.asarray(y, int)
    k = probs.shape[1]
    clipped = np.clip(probs, 1e-7, 1)
    loss = float(log_loss(y, clipped / clipped.sum(1, keepdims=True), sample_weight=weights[y], labels=range(k)))
    if len(np.unique(y)) < k:
        return loss, float("nan")
    scores = positive_scores(probs)
    auroc = roc_auc_score(y, scores) if scores.ndim == 1 else roc_auc_score(y, probs, multi_class="ovr")
    return loss, float(auroc)
