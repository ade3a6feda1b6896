"""Metrics against numbers worked out by hand; patient bootstrap keeps patients whole."""
from collections import Counter

import numpy as np
import pytest

from medssl.errors import DataError
from medssl.evaluate.bootstrap import bootstrap_ci, paired_bootstrap, patient_resamples
from medssl.evaluate.metrics import (binary_metrics, choose_threshold, classification_metrics,
                                     confusion_from_metrics, expected_calibration_error, multiclass_metrics,
                                     resample_metrics)

# 3 negatives (0.1, 0.4, 0.6) and 3 positives (0.35, 0.8, 0.9)
Y = np.array([0, 0, 0, 1, 1, 1])
P = np.array([0.1, 0.4, 0.6, 0.35, 0.8, 0.9])


def test_binary_metrics_by_hand():
    m = binary_metrics(Y, P, threshold=0.5)
    # concordant (pos, neg) pairs: 0.35 beats 0.1 only (1), 0.8 and 0.9 beat all three (3 + 3) -> 7 of 9
    assert m["auroc"] == pytest.approx(7 / 9)
    # ranked 0.9+ 0.8+ 0.6- 0.4- 0.35+ 0.1-: precision at each positive 1, 1, 3/5; each adds recall 1/3
    assert m["auprc"] == pytest.approx((1 + 1 + 3 / 5) / 3)
    # threshold 0.5 calls 0.6, 0.8, 0.9 positive: TP 2, FN 1 (0.35), FP 1 (0.6), TN 2
    assert (m["cm_0_0"], m["cm_0_1"], m["cm_1_0"], m["cm_1_1"]) == (2, 1, 1, 2)
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # squared errors .01 .16 .36 .4225 .04 .01
    assert m["brier"] == pytest.approx(1.0025 / 6)
    # each score in its own 0.1-wide bin -> ECE = mean |y - p| = (.1 + .4 + .6 + .65 + .2 + .1) / 6
    assert m["ece"] == pytest.approx(2.05 / 6)
    # with 3 negatives, specificity >= 90% means no false positive: only 0.8 and 0.9 are found
    assert m["sens_at_spec90"] == pytest.approx(2 / 3) and m["sens_at_spec95"] == pytest.approx(2 / 3)
    assert confusion_from_metrics(m).tolist() == [[2, 1], [1, 2]]


def test_two_column_scores_equal_positive_column():
    two = np.stack([1 - P, P], axis=1)  # (N, 2)
    assert classification_metrics(Y, two, threshold=0.5) == classification_metrics(Y, P, threshold=0.5)


def test_ece_binning_pools_scores_of_a_bin():
    # bin [0.1, 0.2): scores .12, .18 (mean .15) with 1 of 2 positive -> |.5 - .15| weight 1/2
    # bins 0.8 and 0.9: one positive each -> |1 - .85|, |1 - .95| weight 1/4 each
    y, p = np.array([0, 1, 1, 1]), np.array([0.12, 0.18, 0.85, 0.95])
    assert expected_calibration_error(y, p) == pytest.approx(0.5 * 0.35 + 0.25 * 0.15 + 0.25 * 0.05)


def test_choose_threshold_youden_and_target():
    # J per threshold: .9 -> 1/3, .8 -> 2/3 (best), .6 -> 1/3, .4 -> 0, .35 -> 1/3, .1 -> 0
    assert choose_threshold(Y, P) == pytest.approx(0.8)
    assert choose_threshold(Y, P, target_sensitivity=1.0) == pytest.approx(0.35)
    assert choose_threshold(Y, P, target_sensitivity=0.5) == pytest.approx(0.8)


def test_one_class_split_is_a_clear_error():
    with pytest.raises(DataError, match="only class 0"):
        choose_threshold(np.zeros(4, int), np.linspace(0, 1, 4))


def test_multiclass_metrics_by_hand():
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[.7, .2, .1], [.3, .4, .3], [.2, .6, .2], [.1, .8, .1], [.2, .2, .6], [.5, .1, .4]])
    m = multiclass_metrics(y, probs)
    # argmax = 0 1 1 1 2 0 -> rows of the confusion matrix: [1 1 0] [0 2 0] [1 0 1]
    assert confusion_from_metrics(m).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    # per-class F1: precision/recall 1/2,1/2 -> 1/2; 2/3,1 -> 4/5; 1,1/2 -> 2/3
    assert m["f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    # one-vs-rest: class 0 positives .7 and .3 vs .2 .1 .2 .5 -> 7 of 8 pairs; classes 1, 2 separate fully
    assert m["auroc"] == pytest.approx((7 / 8 + 1 + 1) / 3)
    # per-image sum of squared errors .14 .74 .24 .06 .24 .62
    assert m["brier"] == pytest.approx(2.04 / 6)


def test_patient_resamples_keep_patients_whole():
    groups = ["a", "a", "a", "b", "c", "c", "d"]
    sizes = Counter(groups)
    for idx in patient_resamples(groups, n_boot=50, seed=1):
        per_image = Counter(idx.tolist())
        drawn = Counter(groups[i] for i in idx)
        for patient, n_images in drawn.items():
            times = n_images // sizes[patient]
            assert n_images == times * sizes[patient]  # whole patients only
            members = [i for i, g in enumerate(groups) if g == patient]
            assert all(per_image[i] == times for i in members)
        assert len(drawn) <= 4


def test_bootstrap_counts_one_class_resamples():
    # one positive patient among six: a resample misses it with probability (5/6)^6 ~ 33%
    y = np.array([0, 0, 0, 0, 0, 1, 1])
    score = np.array([.1, .2, .3, .4, .5, .7, .9])
    groups = ["p1", "p2", "p3", "p4", "p5", "p6", "p6"]
    cis, skipped = bootstrap_ci(lambda a, b: resample_metrics(a, b, 0.5), y, score, groups, n_boot=200, seed=0)
    assert 30 < skipped < 110
    assert cis["auroc"] == (1.0, 1.0)  # the positive patient always outranks every negative


def test_paired_bootstrap_of_identical_models_is_zero():
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 10)
    score = rng.random(20)
    groups = [f"p{i // 2}" for i in range(20)]
    fn = lambda a, b: resample_metrics(a, b, 0.5)  # noqa: E731
    out, _ = paired_bootstrap(fn, y, score, score, groups, n_boot=100, seed=0, names=("auroc", "sensitivity"))
    assert out == {"auroc": (0.0, 0.0, 0.0), "sensitivity": (0.0, 0.0, 0.0)}


def test_paired_bootstrap_sees_a_better_model():
    y = np.array([0, 1] * 15)
    good = y * 0.6 + np.linspace(0, 0.3, 30)  # separates the classes
    weak = np.linspace(0, 1, 30)[::-1]  # uninformative order
    groups = [f"p{i // 3}" for i in range(30)]
    out, _ = paired_bootstrap(lambda a, b: resample_metrics(a, b, 0.5), y, good, weak, groups, 200, 0)
    delta, low, high = out["auroc"]
    assert delta > 0.3 and 0 < low <= delta <= high


def test_classification_metrics_adds_patient_cis():
    y = np.array([0, 1] * 12)
    score = np.clip(y * 0.3 + np.linspace(0.1, 0.6, 24), 0, 1)
    groups = [f"p{i // 2}" for i in range(24)]
    m = classification_metrics(y, score, threshold=0.5, groups=groups, n_boot=100, seed=0)
    assert 0 <= m["auroc_ci_low"] <= m["auroc"] <= m["auroc_ci_high"] <= 1
    assert m["boot_skipped"] == 0


def test_resample_metrics_equal_scikit_learn_with_ties():
    rng = np.random.default_rng(3)
    for _ in range(20):
        y = rng.integers(0, 2, 40)
        y[:2] = [0, 1]
        p = np.round(rng.random(40), 1)  # many ties
        fast, full = resample_metrics(y, p, 0.5), binary_metrics(y, p, 0.5)
        for name, value in fast.items():
            assert value == pytest.approx(full[name]), name


def test_sensitivity_at_90_and_95_specificity_differ_by_hand():
    # 20 negatives 0.01..0.20: specificity >= 95% allows 1 false positive (0.20), >= 90% allows 2 (0.19, 0.20)
    neg = np.arange(1, 21) / 100
    pos = np.array([0.5, 0.195, 0.185, 0.05])
    y, p = np.r_[np.zeros(20, int), np.ones(4, int)], np.r_[neg, pos]
    m = binary_metrics(y, p, threshold=0.5)
    assert m["sens_at_spec95"] == pytest.approx(2 / 4)  # threshold 0.195: finds 0.5, 0.195
    assert m["sens_at_spec90"] == pytest.approx(3 / 4)  # threshold 0.185: also 0.185
    # the most specific threshold that still finds 3 of 4 positives is 0.185
    assert choose_threshold(y, p, target_sensitivity=0.75) == pytest.approx(0.185)
