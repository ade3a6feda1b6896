"""A ViT encoder built from MONAI blocks, with a token keep-index so MAE encodes only the visible patches.

MONAI's own ViT has no way to drop tokens before the transformer, and its MaskedAutoEncoderViT fails under
autocast (../../shared/ANCHORS.md); this small module keeps MONAI's PatchEmbeddingBlock / TransformerBlock
(SDPA attention via `use_flash_attention=True`) and adds only the gather.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.networks.blocks import PatchEmbeddingBlock, TransformerBlock
from torch import nn

from medssl.errors import ConfigError
from medssl.models.patchify import patchify


def _require_einops() -> None:
    # MONAI's SABlock builds einops layers; without the package it fails deep inside MONAI
    try:
        import einops  # noqa: F401
    except ImportError:
        raise ConfigError("the ViT encoder needs the einops package (MONAI's attention block uses it)",
                          where="encoder.name: vit", fix="pip install einops (or monai[einops])") from None


def transformer_blocks(dim: int, mlp_dim: int, heads: int, depth: int) -> nn.ModuleList:
    """MONAI pre-norm blocks with SDPA attention (`use_flash_attention=True`: flash / memory-efficient kernels
    on CUDA). MONAI builds a `norm_cross_attn` LayerNorm even without cross-attention; it never gets a
    gradient, so it is frozen: DDP then needs no search for unused parameters, AdamW keeps no state for it,
    and the keys stay where MONAI puts them (encoder files load either way)."""
    blocks = nn.ModuleList(TransformerBlock(dim, mlp_dim, heads, qkv_bias=True, use_flash_attention=True)
                           for _ in range(depth))
    for block in blocks:
        block.norm_cross_attn.requires_grad_(False)
    return blocks


class ViTEncoder(nn.Module):
    """Patch embedding (conv) + fixed sin-cos positions + pre-norm transformer; no class token."""

    def __init__(self, in_channels: int, img_size: list[int], patch_size: int, hidden_size: int,
                 num_layers: int, num_heads: int, mlp_dim: int, spatial_dims: int):
        super().__init__()
        _require_einops()
        self.spatial_dims, self.patch_size, self.in_channels = spatial_dims, patch_size, in_channels
        self.grid = [s // patch_size for s in img_size]
        # sin-cos positions (as in MAE): fixed, so a small dataset cannot overfit them; MONAI's builder needs
        # hidden_size divisible by 2*spatial_dims (4 in 2D, 6 in 3D), else learnable positions are used
        pos = "sincos" if hidden_size % (2 * spatial_dims) == 0 else "learnable"
        self.patch_embed = PatchEmbeddingBlock(
            in_channels=in_channels, img_size=img_size, patch_size=patch_size, hidden_size=hidden_size,
            num_heads=num_heads, proj_type="conv", pos_embed_type=pos, spatial_dims=spatial_dims)
        self.blocks = transformer_blocks(hidden_size, mlp_dim, num_heads, num_layers)
        self.norm = nn.LayerNorm(hidden_size)
        self.out_features = hidden_size

    @property
    def num_patches(self) -> int:
        return math.prod(self.grid)

    def forward_tokens(self, x: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, *spatial) -> (B, L_keep, hidden); keep_idx (B, L_keep) selects visible patches."""
        tokens = self.patch_embed(x) if keep_idx is None else self.embed_visible(x, keep_idx)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def embed_visible(self, x: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        """The visible patches' tokens only (B, L_keep, D): patchify, gather, one GEMM with the patch conv's
        own weights. The same numbers as the conv followed by a gather, for a quarter of its work at mask 0.75,
        and a plain matrix product instead of a strided 3D convolution."""
        conv, dim = self.patch_embed.patch_embeddings, self.out_features
        patches = patchify(x, self.patch_size)                              # (B, L, p^nd * C), (p.., C) order
        patches = torch.gather(patches, 1, keep_idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        weight = conv.weight.movedim(1, -1).reshape(dim, -1)                # (D, C, p..) -> (D, p.. * C)
        pos = self.patch_embed.position_embeddings.expand(x.shape[0], -1, -1)
        pos = torch.gather(pos, 1, keep_idx.unsqueeze(-1).expand(-1, -1, dim))
        return self.patch_embed.dropout(F.linear(patches, weight, conv.bias) + pos)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x).mean(dim=1)  # (B, D): mean of tokens
