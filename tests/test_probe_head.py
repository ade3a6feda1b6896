"""The linear-probe head equals scikit-learn's standardised logistic regression, folded into nn.Linear."""
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from medssl.models.probe import fit_probe_head, load_folded


def _data(n_classes, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(60) % n_classes
    # features on very different scales (as pooled CNN features are): only a standardised fit copes
    x = rng.normal(size=(60, 5)) * np.array([1e-3, 1, 10, 100, 1e3]) + y[:, None] * np.array([2e-3, 0, 0, 0, 0])
    return x, y


def test_folded_head_equals_the_sklearn_pipeline_binary_and_multiclass():
    for k in (2, 3):
        x, y = _data(k)
        model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000)).fit(x, y)
        head = nn.Linear(5, k).double()
        load_folded(head, model, k)
        ours = torch.softmax(head(torch.as_tensor(x)), dim=1).detach().numpy()
        np.testing.assert_allclose(ours, model.predict_proba(x), atol=1e-8)


def test_fit_picks_the_strength_with_the_best_validation_score():
    x, y = _data(2)
    head = nn.Linear(5, 2).double()
    seen = []

    def score(candidate):
        p = torch.softmax(candidate(torch.as_tensor(x)), 1)[:, 1].detach().numpy()
        auroc = float(((p[y == 1][:, None] > p[y == 0][None, :]).mean()))
        seen.append(auroc)
        return auroc, {"loss": -auroc, "auroc": auroc}

    history = fit_probe_head(head, x, y, 2, balanced=True, score_fn=score, seed=0)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    final = torch.softmax(head(torch.as_tensor(x)), 1)[:, 1].detach().numpy()
    assert float(((final[y == 1][:, None] > final[y == 0][None, :]).mean())) == max(seen) > 0.9
