"""Reconstruction + contrastive as one weighted sum (the MONAI tutorial's recipe, done the MAE way).

Both views are masked and encoded once; the decoder reconstructs each view's masked patches, and the mean of
each view's visible tokens is projected for NT-Xent. One encoder pass over 1 − mask_ratio of the tokens
serves both losses, instead of the tutorial's two full passes.
"""
from __future__ import annotations

import torch
from torch import nn

from medssl.config import ContrastiveConfig, MaskedConfig, ViewsConfig
from medssl.ssl.base import SSLMethod
from medssl.models.heads import projection_head
from medssl.ssl.contrastive import positive_views
from medssl.ssl.losses import nt_xent
from medssl.ssl.masked import MaskedAutoencoder


class MaskedContrastive(SSLMethod):
    def __init__(self, encoder: nn.Module, masked: MaskedConfig, contrastive: ContrastiveConfig,
                 views: ViewsConfig):
        super().__init__()
        self.mae = MaskedAutoencoder(encoder, masked, views)  # checks the encoder is a ViT
        self.masked_cfg, self.contrastive_cfg = masked, contrastive
        self.head = projection_head(encoder.out_features, contrastive.projection_dim)
        self.views = views

    @property
    def encoder(self) -> nn.Module:
        # registered once (under mae.): a second registration would store every weight twice in checkpoints
        return self.mae.encoder

    def forward(self, batch: dict) -> dict:
        generator = self.views_generator(batch)
        v1, v2 = positive_views(batch, self.contrastive_cfg.positives, self.views, generator)  # as SimCLR
        both = torch.cat([v1, v2])  # (2B, C, *crop)
        latent, mask, ids_restore = self.mae.encode_masked(both, generator)
        loss_masked = self.mae.reconstruction_loss(both, latent, mask, ids_restore)
        z1, z2 = self.head(latent.mean(dim=1)).chunk(2)  # (B, projection_dim) each
        loss_contrastive = nt_xent(z1, z2, self.contrastive_cfg.temperature)
        loss = self.masked_cfg.weight * loss_masked + self.contrastive_cfg.weight * loss_contrastive
        return {"loss": loss, "loss_masked": loss_masked.detach(), "loss_contrastive": loss_contrastive.detach()}
