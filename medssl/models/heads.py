"""Heads put on top of an encoder's pooled features: projection (contrastive) and linear (classification)."""
from __future__ import annotations

from torch import nn


def projection_head(in_features: int, out_features: int = 128, hidden: int | None = None) -> nn.Sequential:
    """SimCLR v2-style MLP; BatchNorm keeps the projected features well spread in small batches."""
    hidden = hidden or in_features
    return nn.Sequential(
        nn.Linear(in_features, hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, out_features),
    )


def linear_head(in_features: int, num_classes: int) -> nn.Linear:
    return nn.Linear(in_features, num_classes)
