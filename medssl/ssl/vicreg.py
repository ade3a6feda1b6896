"""VICReg: two views, an expander, and invariance + variance + covariance terms. No negatives and no momentum
encoder, so it needs neither large batches nor a queue: a method for small CPU batches.

forward(batch) makes its own views on the batch's device, as SimCLR does.
"""
from __future__ import annotations

from torch import nn

from medssl.config import VICRegConfig, ViewsConfig
from medssl.ssl.base import SSLMethod, encode_pair
from medssl.ssl.contrastive import positive_views
from medssl.ssl.losses import vicreg_terms


def expander(in_features: int, dim: int) -> nn.Sequential:
    """VICReg's 3-layer MLP: Linear-BN-ReLU twice, then Linear (the terms act on its output)."""
    return nn.Sequential(
        nn.Linear(in_features, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
        nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
        nn.Linear(dim, dim),
    )


class VICReg(SSLMethod):
    def __init__(self, encoder: nn.Module, cfg: VICRegConfig, views: ViewsConfig):
        super().__init__()
        self.encoder, self.cfg, self.views = encoder, cfg, views
        self.expander = expander(encoder.out_features, cfg.expander_dim)

    def forward(self, batch: dict) -> dict:
        v1, v2 = positive_views(batch, "views", self.views, self.views_generator(batch))
        z1, z2 = self.expander(encode_pair(self.encoder, v1, v2)).chunk(2)  # (B, expander_dim) each
        terms = vicreg_terms(z1, z2)
        cfg = self.cfg
        loss = (cfg.invariance_weight * terms["invariance"] + cfg.variance_weight * terms["variance"]
                + cfg.covariance_weight * terms["covariance"])
        return {"loss": loss, **{f"loss_{name}": value.detach() for name, value in terms.items()}}
