"""A 2D encoder scoring a whole 3D volume: every axial slice encoded, the slice features pooled to one vector.

A 2D pipeline over 3D volumes otherwise sees one slice per volume (the central one), so a lesion elsewhere is
invisible to it. `SlicePooled` runs the 2D encoder on all axial slices (the last array axis after RAS
orientation, the axis medssl's 2D loaders slice along) in chunks, and pools over slices: "mean" (diffuse
findings), "max" (a finding in any slice) or "meanmax" (both, concatenated). It is an encoder like any other:
(B, C, X, Y, Z) -> (B, out_features), so classifiers, probes and prediction use it unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

POOLS = ("mean", "max", "meanmax")


class SlicePooled(nn.Module):
    def __init__(self, encoder: nn.Module, pool: str = "meanmax", chunk: int = 64):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"unknown slice pooling {pool!r}: one of {POOLS}")
        self.encoder, self.pool, self.chunk = encoder, pool, chunk
        self.out_features = encoder.out_features * (2 if pool == "meanmax" else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, X, Y, Z) -> (B, out_features); a 2D batch (B, C, X, Y) is one slice per image."""
        if x.ndim == 4:
            x = x.unsqueeze(-1)
        b, c, height, width, depth = x.shape
        slices = x.permute(0, 4, 1, 2, 3).reshape(b * depth, c, height, width)  # (B·Z, C, X, Y), volume-major
        feats = torch.cat([self.encoder(part) for part in slices.split(self.chunk)])  # (B·Z, F)
        feats = feats.view(b, depth, -1)  # (B, Z, F)
        if self.pool == "mean":
            return feats.mean(dim=1)
        if self.pool == "max":
            return feats.amax(dim=1)
        return torch.cat([feats.mean(dim=1), feats.amax(dim=1)], dim=1)


def slice_pooled(encoder: nn.Module, encoder_dims: int, data_dims: int, pool: str = "meanmax") -> nn.Module:
    """The encoder to score `data_dims`-D images with: a 2D encoder on 3D volumes becomes SlicePooled."""
    return SlicePooled(encoder, pool) if encoder_dims == 2 and data_dims == 3 else encoder
