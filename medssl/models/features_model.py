"""The features arm as a model that takes images: engineered features (models/engineered.py, settings recorded)
→ the probe's standardisation → K logits, all in float64, so softmax(model(x)) is the fitted probe's
predict_proba on the same images (within float64 rounding of one matrix product).

It is an nn.Module with the Classifier's interface (threshold buffer, spatial_dims, n_classes), so the ladder's
kept package (export/package.py: safetensors + JSON, no pickle), external sites, `medssl predict` and the MLflow
pyfunc score it like a deep model. The features are computed with numpy / scikit-image on the CPU: no gradient,
and no ONNX / TorchScript form (export/formats.py says so).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from medssl.models.engineered import EXTRACTOR, GLCM_LEVELS, GLCM_PROPS, GRIDS, QUANTILES, image_features
from medssl.models.probe import class_logits

DEFAULT_SETTINGS = {"grids": list(GRIDS), "quantiles": list(QUANTILES), "glcm_levels": GLCM_LEVELS,
                    "glcm_props": list(GLCM_PROPS)}


class FeaturesClassifier(nn.Module):
    """(B, C, *spatial) images -> (B, K) float64 logits of a standardised logistic regression on their features."""

    def __init__(self, n_features: int, n_classes: int, settings: dict | None = None, threshold: float = 0.5,
                 spatial_dims: int | None = None):
        super().__init__()
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.spatial_dims, self.n_classes, self.n_features = spatial_dims, n_classes, n_features
        # the StandardScaler's fitted mean and scale, kept apart (not folded into the head) so the arithmetic is
        # scikit-learn's own: (x - mean) / scale, then x @ coef.T + intercept
        self.register_buffer("mean", torch.zeros(n_features, dtype=torch.float64))
        self.register_buffer("scale", torch.ones(n_features, dtype=torch.float64))
        self.head = nn.Linear(n_features, n_classes, dtype=torch.float64)
        self.register_buffer("threshold", torch.tensor(float(threshold), dtype=torch.float64))  # exact in the spec

    def describe(self) -> dict:
        """What a package records to rebuild this model (export/spec.py: architecture.features)."""
        return {"extractor": EXTRACTOR, "n_features": self.n_features, **self.settings}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        images = x.detach().cpu().numpy()  # (B, C, *spatial)
        rows = [image_features(image, **self.settings) for image in images]
        return torch.from_numpy(np.stack(rows)).to(self.mean.device)  # (B, F) float64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        standardised = (self.features(x) - self.mean) / self.scale  # (B, F)
        return self.head(standardised)  # (B, K) logits

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self(x), dim=1)  # (B, K)


def from_probe(pipeline, n_classes: int, n_features: int, threshold: float, spatial_dims: int | None,
               settings: dict | None = None) -> FeaturesClassifier:
    """A FeaturesClassifier holding a fitted models.probe.fit_logistic pipeline (StandardScaler, LogisticRegression)."""
    scaler, logreg = pipeline[0], pipeline[-1]
    model = FeaturesClassifier(n_features, n_classes, settings, threshold, spatial_dims)
    weight, bias = class_logits(logreg, logreg.coef_, logreg.intercept_, n_classes)
    with torch.no_grad():
        model.mean.copy_(torch.from_numpy(np.asarray(scaler.mean_, np.float64)))
        model.scale.copy_(torch.from_numpy(np.asarray(scaler.scale_, np.float64)))
        model.head.weight.copy_(torch.from_numpy(weight))
        model.head.bias.copy_(torch.from_numpy(bias))
    return model.eval()
