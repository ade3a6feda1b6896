"""Segmentation metrics (MONAI): Dice, HD95 and surface Dice per class and image, patient bootstrap intervals
and paired SSL - scratch differences of the patient-mean Dice.

Conventions for empty structures (they decide what a small-label ladder reports, so they are explicit):
- truth and prediction both empty for a class: every score NaN, left out of the means (as MONAI's
  ignore_empty and nnU-Net do): counting it as Dice 1 would inflate multi-class scores on images that lack a
  class, and the interval would claim a precision the data do not have.
- truth non-empty, prediction empty (or the reverse): Dice 0, surface Dice 0, HD95 NaN (no surface to measure
  from) and counted in `hd95_missing`, never silently averaged as a number.
A patient's score is the mean over its images; the cohort score is the mean over patients (each patient
counts once, whatever its number of images), and the bootstrap resamples patients.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice
from monai.networks.utils import one_hot

from medssl.evaluate.bootstrap import patient_resamples

SCORES = ("dice", "hd95", "surface_dice")


def _onehot(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """(*spatial) int -> (1, K, *spatial) float."""
    return one_hot(torch.as_tensor(np.asarray(labels), dtype=torch.long)[None, None], n_classes, dim=1).float()


def image_scores(pred: np.ndarray, truth: np.ndarray, n_classes: int, spacing, tolerance_mm: float = 2.0
                 ) -> list[dict]:
    """One dict per foreground class (1..K-1): {"class", "dice", "hd95", "surface_dice"} for one image.
    pred / truth: integer label maps of the same shape; spacing: mm per axis (HD95 and surface Dice in mm)."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    p, t = _onehot(pred, n_classes), _onehot(truth, n_classes)
    spacing = [float(s) for s in spacing]
    with warnings.catch_warnings():   # MONAI warns on empty classes; they are handled explicitly below
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)   # MONAI 1.5's own deprecated argument, inside MONAI
        dice = compute_dice(p, t, include_background=False, ignore_empty=False)[0]            # (K-1,)
        hd = compute_hausdorff_distance(p, t, include_background=False, percentile=95, spacing=spacing)[0]
        nsd = compute_surface_dice(p, t, [tolerance_mm] * (n_classes - 1), include_background=False,
                                   spacing=spacing)[0]
    rows = []
    for k in range(1, n_classes):
        has_p, has_t = bool(p[0, k].any()), bool(t[0, k].any())
        both = has_p and has_t
        rows.append({"class": k,
                     "dice": float(dice[k - 1]) if has_p or has_t else float("nan"),
                     "hd95": float(hd[k - 1]) if both else float("nan"),
                     "surface_dice": float(nsd[k - 1]) if both else (0.0 if has_p or has_t else float("nan")),
                     "hd95_missing": bool(has_p != has_t)})
    return rows


def patient_means(scores: pd.DataFrame, metric: str = "dice") -> pd.Series:
    """Per-image rows (image_id, patient_id, class, metric...) -> {patient_id: mean over images and classes}."""
    per_image = scores.groupby(["patient_id", "image_id"])[metric].mean()
    return per_image.groupby(level="patient_id").mean()


def summarise(scores: pd.DataFrame, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Cohort means with patient-bootstrap percentile intervals, and Dice per class."""
    out = {"patients": int(scores["patient_id"].nunique()), "images": int(scores["image_id"].nunique()),
           "hd95_missing": int(scores["hd95_missing"].sum())}
    for metric in SCORES:
        values = patient_means(scores, metric).dropna()
        out[metric] = float(values.mean()) if len(values) else float("nan")
        low_high = patient_interval(values.to_numpy(), values.index, n_boot, seed, alpha)
        out[f"{metric}_low"], out[f"{metric}_high"] = low_high
    for k, part in scores.groupby("class"):
        out[f"dice_class{int(k)}"] = float(patient_means(part).mean())
    return out


def patient_interval(values: np.ndarray, patients, n_boot: int, seed: int, alpha: float) -> tuple[float, float]:
    """Percentile interval of the mean of one value per patient, resampling patients."""
    if len(values) < 2:   # one patient: no spread to resample, no interval
        return float("nan"), float("nan")
    means = [values[idx].mean() for idx in patient_resamples(list(patients), n_boot, seed)]
    low, high = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def paired_delta(a: pd.DataFrame, b: pd.DataFrame, metric: str = "dice", n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float, float]:
    """(mean A - B, low, high) over the patients both were scored on, resampling patients jointly."""
    pa, pb = patient_means(a, metric), patient_means(b, metric)
    common = pa.index.intersection(pb.index)
    diff = (pa.loc[common] - pb.loc[common]).dropna()
    if diff.empty:
        return float("nan"), float("nan"), float("nan")
    low, high = patient_interval(diff.to_numpy(), diff.index, n_boot, seed, alpha)
    return float(diff.mean()), low, high
