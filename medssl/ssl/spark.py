"""SparK: masked modelling for CNN encoders (Tian et al. 2023, "Designing BERT for convolutional networks:
sparse and hierarchical masked modeling"), 2D and 3D, for medssl's ResNet encoders.

random_masking picks input patches (patchify.py's grid) -> the ResNet runs as a sparse CNN on the masked
input (models/sparse.py: holes stay empty at every level) -> each level's holes are filled with that level's
learned mask token ("densified") -> a UNet-like decoder climbs back from layer4 (1/32) to layer1 (1/4) with
the levels between as skips (decoders.up_block), then x4 to full resolution -> MSE on the masked patches
only, targets standardised per patch (losses.masked_patch_mse). The same step shape as MAE (masked.py); only
the encoder side differs: a ViT can drop tokens, a CNN needs its holes kept empty.
"""
from __future__ import annotations

import math

import torch
from monai.networks.layers import Conv
from torch import nn

from medssl.augment.views import make_views
from medssl.config import SparKConfig, ViewsConfig
from medssl.errors import ConfigError
from medssl.models.decoders import resnet_widths, up_block
from medssl.models.patchify import patchify, random_masking
from medssl.models.sparse import MaskPyramid, sparse_resnet_features
from medssl.ssl.base import SSLMethod
from medssl.ssl.losses import masked_patch_mse


class SparKDecoder(nn.Module):
    """Densify every level (its mask token where the level is empty), then transposed conv x2 + skip + residual
    conv block per level from 1/32 up to 1/4, and a transposed conv x4 that maps each 1/4 voxel to its 4^d
    pixels (a linear per-position head, as MAE's). The stem's 1/2 level is not decoded: its block would cost
    3x the whole ResNet-10 at 1/4 width (32^3 crops, CPU), and a patch of 8 already spans two 1/4 voxels per edge."""

    def __init__(self, widths: list[int], spatial_dims: int, out_channels: int):
        super().__init__()
        # widths: layer1 (1/4) .. layer4 (1/32) channels; one learned token per level (SparK's [M])
        self.tokens = nn.ParameterList(nn.Parameter(torch.randn(1, w, *[1] * spatial_dims) * 0.02) for w in widths)
        self.ups = nn.ModuleList(up_block(spatial_dims, cin, cout) for cin, cout in zip(widths[:0:-1], widths[-2::-1]))
        self.head = Conv[Conv.CONVTRANS, spatial_dims](widths[0], out_channels, kernel_size=4, stride=4)

    def forward(self, feats: list[torch.Tensor], keeps: list[torch.Tensor]) -> torch.Tensor:
        """feats[i] (B, C_i, *S_i) zero where keeps[i] (B, 1, *S_i) is 0 -> image (B, out_channels, *4·S_0)."""
        dense = [torch.where(k.bool(), f, t.to(f.dtype)) for f, k, t in zip(feats, keeps, self.tokens)]
        out = dense[-1]  # (B, C4, S/32)
        for up, skip in zip(self.ups, reversed(dense[:-1])):
            out = up(out, skip)  # up to (B, C1, S/4)
        return self.head(out)  # (B, C, *S)


class SparK(SSLMethod):
    def __init__(self, encoder: nn.Module, cfg: SparKConfig, views: ViewsConfig, spatial_dims: int):
        super().__init__()
        if not hasattr(encoder, "layer4"):
            raise ConfigError(f"ssl.spark needs a ResNet encoder (it masks a CNN's feature maps), got "
                              f"{type(encoder).__name__}", where="encoder.name / ssl.spark",
                              fix="use a resnet* encoder, or ssl.masked (MAE) for a ViT")
        self.encoder, self.cfg, self.views = encoder, cfg, views
        self.in_channels = encoder.conv1.in_channels
        self.decoder = SparKDecoder(resnet_widths(encoder)[1:], spatial_dims, self.in_channels)

    def reconstruct(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, C, *S), mask (B, L) with 1 = masked patch (patchify's row-major grid) -> image (B, C, *S)."""
        grid = [s // self.cfg.patch_size for s in x.shape[2:]]
        keep = (1 - mask).reshape(x.shape[0], 1, *grid).to(x.dtype)  # (B, 1, *grid), 1 = visible
        masks = MaskPyramid(keep)
        feats = sparse_resnet_features(self.encoder, x, masks)[1:]  # layer1-4: the levels the decoder reads
        return self.decoder(feats, [masks.at(f.shape[2:]) for f in feats])

    def masked_loss(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE over the masked patches of x (B, C, *S) only; mask (B, L) with 1 = masked."""
        pred = patchify(self.reconstruct(x, mask), self.cfg.patch_size)  # (B, L, P)
        return masked_patch_mse(pred, patchify(x, self.cfg.patch_size), mask, self.cfg.norm_pix_loss)

    def forward(self, batch: dict) -> dict:
        generator = self.views_generator(batch)  # views and masks: the method's own stream
        x = make_views(batch["image"], self.views, generator)  # (B, C, *crop)
        bad = [s for s in x.shape[2:] if s % self.cfg.patch_size or s % 32]
        if bad:
            raise ConfigError(f"crop {list(x.shape[2:])} is not a multiple of 32 and of ssl.spark.patch_size "
                              f"{self.cfg.patch_size}", where="pretrain.crop / ssl.spark.patch_size",
                              fix="e.g. crop [32, 32, 32] with patch_size 8")
        length = math.prod(s // self.cfg.patch_size for s in x.shape[2:])
        _, mask, _ = random_masking(x.shape[0], length, self.cfg.mask_ratio, x.device, generator)  # (B, L)
        loss = self.masked_loss(x, mask)
        return {"loss": loss, "loss_masked": loss.detach()}
