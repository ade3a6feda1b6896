"""A 2D encoder scoring a whole 3D volume: every axial slice encoded, the slice features pooled to one vector.

A 2D pipeline over 3D volumes otherwise sees one slice per volume (the central one), so a lesion elsewhere is
invisible to it. `SlicePooled` runs the 2D encoder on all axial slices (the last array axis after RAS
orientation, the axis medssl's 2D loaders slice along) in chunks, and pools over slices: "mean" (diffuse
findings), "max" (a finding in any slice) or "meanmax" (both, concatenated). It is an encoder like any other:
(B, C, X, Y, Z) -> (B, out_features), so classifiers, probes and prediction use it unchanged.
`finetune.slice_pooling` chooses the pooling ("central" keeps the central-slice behaviour); `volume_pooling`
decides, from the cached images, whether a ladder's models are slice-pooled at all.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from medssl.errors import DataError

POOLS = ("mean", "max", "meanmax")
CENTRAL = "central"  # the setting that keeps one (central) axial slice per volume


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
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            feats = self.encoder(slices)  # a traced graph must not fix the number of chunks: any depth runs
        else:  # chunks bound the memory of a deep volume
            feats = torch.cat([self.encoder(part) for part in slices.split(self.chunk)])  # (B·Z, F)
        feats = feats.reshape(b, depth, -1)  # (B, Z, F)
        if self.pool == "mean":
            return feats.mean(dim=1)
        if self.pool == "max":
            return feats.amax(dim=1)
        return torch.cat([feats.mean(dim=1), feats.amax(dim=1)], dim=1)


def slice_pooled(encoder: nn.Module, encoder_dims: int, data_dims: int, pool: str = "meanmax") -> nn.Module:
    """The encoder to score `data_dims`-D images with: a 2D encoder on 3D volumes becomes SlicePooled."""
    return SlicePooled(encoder, pool) if encoder_dims == 2 and data_dims == 3 else encoder


def volume_pooling(setting: str, encoder_dims: int, shapes: Iterable[tuple[int, ...]]) -> str | None:
    """The pooling a ladder's models use, or None (models read their encoder's own input: a 2D encoder the
    central slice of a volume). `shapes`: the cached (C, *spatial) shapes of the images it trains and scores.
    Slice pooling batches whole volumes, so they must be all 3D with one number of slices (DataError if not)."""
    if encoder_dims != 2 or setting == CENTRAL:
        return None
    if setting not in POOLS:
        raise ValueError(f"unknown slice pooling {setting!r}: one of {POOLS + (CENTRAL,)}")
    shapes = {tuple(s) for s in shapes}
    volumes = {s for s in shapes if len(s) == 4}    # (C, X, Y, Z)
    if not volumes:
        return None  # 2D images: every image is its own single slice
    if len(shapes) > 1:
        kinds = sorted(shapes)[:3]
        raise DataError(f"slice pooling batches whole volumes, but the cached images have {len(shapes)} shapes "
                        f"(e.g. {kinds})", where="finetune.slice_pooling",
                        fix="give volumes of one slice count (a 2D pipeline keeps each volume's native slices), "
                            "or set finetune.slice_pooling: central")
    return setting
