"""The all-replicates-at-once metrics equal scikit-learn on every expanded replicate (random cases, ties,
K = 2..5 classes), and the weight matrix holds the same draws as the per-replicate bootstrap."""
import numpy as np
import pytest
from sklearn import metrics as skm

from medssl.evaluate.bootstrap import bootstrap_ci, patient_resamples, resample_weights
from medssl.evaluate.metrics import classification_metrics, multiclass_metrics, resample_metrics
from medssl.evaluate.resampled import replicate_metrics


def _case(rng, n_classes: int, n: int = 30):
    y = rng.integers(0, n_classes, n)
    y[:n_classes] = np.arange(n_classes)  # every class present in the full set
    if n_classes == 2:
        score = np.round(rng.random(n), 1)  # many ties
        return y, score, (score >= 0.5).astype(int)
    probs = rng.dirichlet(np.ones(n_classes), n)
    probs[::4] = probs[0]  # tied rows
    return y, probs, probs.argmax(axis=1)


def _sklearn(y, score, predicted) -> dict:
    if score.ndim == 1:
        return {"auroc": skm.roc_auc_score(y, score), "auprc": skm.average_precision_score(y, score),
                "balanced_accuracy": skm.balanced_accuracy_score(y, predicted),
                "sensitivity": skm.recall_score(y, predicted), "f1": skm.f1_score(y, predicted, zero_division=0),
                "specificity": skm.recall_score(y, predicted, pos_label=0), "brier": skm.brier_score_loss(y, score)}
    return {"auroc": skm.roc_auc_score(y, score, multi_class="ovr", average="macro"),
            "balanced_accuracy": skm.balanced_accuracy_score(y, predicted),
            "f1": skm.f1_score(y, predicted, average="macro", zero_division=0),
            "brier": multiclass_metrics(y, score)["brier"]}


@pytest.mark.parametrize("n_classes", [2, 3, 5])
def test_every_replicate_equals_scikit_learn(n_classes):
    rng = np.random.default_rng(n_classes)
    for case in range(5):
        y, score, predicted = _case(rng, n_classes)
        groups = [f"p{i // 2}" for i in range(len(y))]  # two images per patient
        weights = resample_weights(groups, 25, seed=case)  # (25, N)
        fast = replicate_metrics(weights, y, score, predicted)
        assert set(fast) == set(_sklearn(y, score, predicted)) | ({"auprc", "sensitivity", "specificity"}
                                                                  if n_classes == 2 else set())
        for b, w in enumerate(weights):
            idx = np.repeat(np.arange(len(y)), w.astype(int))
            if len(np.unique(y[idx])) < n_classes:
                assert np.isnan(fast["auroc"][b])  # undefined, never filled in
                continue
            for name, value in _sklearn(y[idx], score[idx], predicted[idx]).items():
                assert fast[name][b] == pytest.approx(value, abs=1e-12), (name, b)


def test_weights_hold_the_draws_of_patient_resamples():
    groups = ["a", "a", "b", "c", "c", "c", "d"]
    weights = resample_weights(groups, 40, seed=7)
    for w, idx in zip(weights, patient_resamples(groups, 40, seed=7)):
        assert w.tolist() == np.bincount(idx, minlength=len(groups)).tolist()


def test_fast_intervals_equal_the_per_replicate_loop():
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 15)
    score = np.clip(0.3 * y + rng.random(30) * 0.7, 0, 1)
    groups = [f"p{i // 3}" for i in range(30)]
    fast = classification_metrics(y, score, 0.5, groups=groups, n_boot=200, seed=3)
    slow, skipped = bootstrap_ci(lambda a, s: resample_metrics(a, s, 0.5), y, score, groups, 200, 3)
    assert fast["boot_skipped"] == skipped
    for name, (low, high) in slow.items():
        assert (fast[f"{name}_ci_low"], fast[f"{name}_ci_high"]) == pytest.approx((low, high)), name


def test_fast_paired_intervals_equal_the_per_replicate_loop():
    from medssl.evaluate.bootstrap import paired_bootstrap, paired_intervals
    rng = np.random.default_rng(4)
    y = np.arange(36) % 3
    good, weak = rng.dirichlet(np.ones(3), 36), rng.dirichlet(np.ones(3), 36)
    good[np.arange(36), y] += 1.0
    good /= good.sum(axis=1, keepdims=True)
    groups = [f"p{i // 2}" for i in range(36)]
    slow, skipped = paired_bootstrap(multiclass_metrics, y, good, weak, groups, 150, 2, names=("auroc", "f1"))
    fast, fast_skipped = paired_intervals(y, good, good.argmax(1), weak, weak.argmax(1), groups, 150, 2,
                                          names=("auroc", "f1"))
    assert fast_skipped == skipped
    for name in ("auroc", "f1"):
        assert fast[name] == pytest.approx(slow[name]), name
