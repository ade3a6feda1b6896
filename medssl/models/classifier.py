"""The classifier the ladder fits and medssl serves: an encoder and a linear head over its pooled features."""
from __future__ import annotations

import torch
from torch import nn

from medssl.models.heads import linear_head


class Classifier(nn.Module):
    """Per-image (2D) or per-volume (3D) classifier; K = 2 logits for binary problems."""

    def __init__(self, encoder: nn.Module, n_classes: int, threshold: float = 0.5, spatial_dims: int | None = None):
        super().__init__()
        self.encoder = encoder
        self.spatial_dims = spatial_dims  # kept so prediction feeds the same 2D slices / 3D volumes
        self.n_classes = n_classes
        self.head = linear_head(encoder.out_features, n_classes)
        # a buffer, so the validation-chosen operating point travels with the saved / logged model
        self.register_buffer("threshold", torch.tensor(float(threshold)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))  # (B, C, *spatial) -> (B, F) -> (B, K) logits

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self(x), dim=1)  # (B, K)
