"""Masked autoencoder (MAE) for 2D and 3D ViT encoders: encode the visible patches only, reconstruct the rest.

Follows the shape of facebookresearch/mae's models_mae.py (random_masking / forward_encoder / forward_decoder
/ forward_loss), with N-dimensional patches (patchify.py) and MONAI transformer blocks (SDPA attention).
"""
from __future__ import annotations

import torch
from torch import nn

from medssl.config import MaskedConfig, ViewsConfig
from medssl.errors import ConfigError
from medssl.models.vit import ViTEncoder, transformer_blocks
from medssl.ssl.base import SSLMethod
from medssl.ssl.losses import masked_patch_mse
from medssl.models.patchify import patchify, random_masking
from medssl.augment.views import make_views


class MAEDecoder(nn.Module):
    """Light transformer over all L tokens: visible ones from the encoder, a shared mask token elsewhere."""

    def __init__(self, encoder: ViTEncoder, cfg: MaskedConfig):
        super().__init__()
        dim = cfg.decoder_dim
        if dim % cfg.decoder_heads:
            raise ConfigError(f"decoder_dim {dim} is not divisible by decoder_heads {cfg.decoder_heads}",
                              where="ssl.masked.decoder_dim / decoder_heads", fix="e.g. 256 with 8 heads")
        self.embed = nn.Linear(encoder.out_features, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, encoder.num_patches, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.blocks = transformer_blocks(dim, 4 * dim, cfg.decoder_heads, cfg.decoder_depth)
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, encoder.patch_size ** encoder.spatial_dims * encoder.in_channels)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (B, L_keep, D_enc), ids_restore (B, L) -> predicted patches (B, L, P)."""
        x = self.embed(latent)  # (B, L_keep, dim)
        b, n_keep, dim = x.shape
        fill = self.mask_token.to(x.dtype).expand(b, ids_restore.shape[1] - n_keep, dim)
        x = torch.cat([x, fill], dim=1)  # shuffled order: visible first
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim)) + self.pos  # grid order
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))


class MaskedAutoencoder(SSLMethod):
    def __init__(self, encoder: nn.Module, cfg: MaskedConfig, views: ViewsConfig):
        super().__init__()
        if not isinstance(encoder, ViTEncoder):
            raise ConfigError("masked reconstruction needs a ViT encoder (it drops patch tokens)",
                              where="encoder.name / ssl.masked",
                              fix="use encoder name: vit (configs/encoders/vit_tiny.yaml), or ssl.contrastive only")
        self.encoder, self.cfg, self.views = encoder, cfg, views
        self.decoder = MAEDecoder(encoder, cfg)

    def encode_masked(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """x (B, C, *crop) -> latent of the visible patches (B, L_keep, D), mask (B, L), ids_restore (B, L)."""
        keep_idx, mask, ids_restore = random_masking(x.shape[0], self.encoder.num_patches,
                                                     self.cfg.mask_ratio, x.device, generator)
        return self.encoder.forward_tokens(x, keep_idx), mask, ids_restore

    def reconstruction_loss(self, x: torch.Tensor, latent, mask, ids_restore) -> torch.Tensor:
        pred = self.decoder(latent, ids_restore)  # (B, L, P)
        target = patchify(x, self.encoder.patch_size)  # (B, L, P)
        return masked_patch_mse(pred, target, mask, self.cfg.norm_pix_loss)

    def forward(self, batch: dict) -> dict:
        generator = self.views_generator(batch)  # views and masks: the method's own stream
        x = make_views(batch["image"], self.views, generator)
        loss = self.reconstruction_loss(x, *self.encode_masked(x, generator))
        return {"loss": loss, "loss_masked": loss.detach()}
