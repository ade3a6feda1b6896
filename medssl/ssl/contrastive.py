"""SimCLR (two random views of one crop) and MICLe-style positives (crops of two images of one patient/study).

forward(batch) makes its own views on the batch's device; batch["image"] (B, C, *crop) and, for patient /
study positives, batch["pair"] of the same shape come straight from the loader.
"""
from __future__ import annotations

import torch
from torch import nn

from medssl.config import ContrastiveConfig, ViewsConfig
from medssl.ssl.base import SSLMethod
from medssl.models.heads import projection_head
from medssl.ssl.losses import nt_xent
from medssl.augment.views import make_views


def positive_views(batch: dict, positives: str, views: ViewsConfig,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two augmented views (B, C, *crop); the second from batch["pair"] for patient/study positives."""
    x = batch["image"]
    other = batch.get("pair") if positives != "views" else None  # no pair in the batch: two views of x
    return make_views(x, views, generator), make_views(x if other is None else other, views, generator)


class SimCLR(SSLMethod):
    def __init__(self, encoder: nn.Module, cfg: ContrastiveConfig, views: ViewsConfig):
        super().__init__()
        self.encoder, self.cfg, self.views = encoder, cfg, views
        self.head = projection_head(encoder.out_features, cfg.projection_dim)

    def project(self, v1: torch.Tensor, v2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # one encoder call on both views: half the kernel launches, and BatchNorm sees the whole 2B batch
        x = torch.cat([v1, v2])  # (2B, C, *crop)
        if x.ndim == 4 and x.is_cuda:  # NHWC input makes cuDNN pick its faster tensor-core 2D kernels
            x = x.contiguous(memory_format=torch.channels_last)
        z = self.head(self.encoder(x))  # (2B, projection_dim)
        return z.chunk(2)

    def forward(self, batch: dict) -> dict:
        z1, z2 = self.project(*positive_views(batch, self.cfg.positives, self.views, self.views_generator(batch)))
        loss = nt_xent(z1, z2, self.cfg.temperature)
        return {"loss": loss, "loss_contrastive": loss.detach()}
