"""K classifiers scored as one: the mean of their class probabilities.

The fine-tuned ladder arms keep the K inner-CV fold models of a rung (ladder/classifier.py): each of them
predicted its own held-out fold, and those out-of-fold predictions chose the epochs and the binary threshold,
so the threshold is applied to the very models it was chosen on, not to a refit whose score scale differs.
forward returns log(mean probability), so softmax(forward(x)) == mean_k softmax(member_k(x)) and every user of
a Classifier (score_dataset, the package, the MLflow pyfunc, ONNX / TorchScript exports) scores it unchanged.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class Ensemble(nn.Module):
    """Members share architecture, classes and input; `threshold` is the ensemble's (binary) operating point."""

    def __init__(self, members: list[nn.Module], threshold: float = 0.5):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.spatial_dims = getattr(members[0], "spatial_dims", None)
        self.n_classes = members[0].n_classes
        self.register_buffer("threshold", torch.tensor(float(threshold), dtype=torch.float64))  # exact in the spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log_probs = torch.stack([torch.log_softmax(m(x), dim=1) for m in self.members])  # (M, B, K)
        return torch.logsumexp(log_probs, dim=0) - math.log(len(self.members))  # (B, K) log mean probability

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self(x), dim=1)  # (B, K)
