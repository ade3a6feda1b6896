"""N-dimensional patchify / unpatchify and MAE's per-sample random masking, for 2D and 3D, any channel count.

Token order is row-major over the patch grid, the order MONAI's conv PatchEmbeddingBlock produces
(conv output flattened from dim 2), so token i of the encoder and patch i of the target are the same place.
"""
from __future__ import annotations

import torch


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, *S) -> (B, L, prod(p)·C), each patch vector ordered (p1, p2[, p3], C)."""
    b, c, *spatial = x.shape
    nd = len(spatial)
    grid = [s // patch for s in spatial]
    split = [b, c]
    for g in grid:
        split += [g, patch]
    x = x.reshape(split)  # (B, C, g1, p, g2, p[, g3, p])
    order = [0] + [2 + 2 * i for i in range(nd)] + [3 + 2 * i for i in range(nd)] + [1]
    return x.permute(order).reshape(b, -1, patch ** nd * c)


def unpatchify(tokens: torch.Tensor, patch: int, grid: list[int], channels: int) -> torch.Tensor:
    """Inverse of patchify: (B, L, prod(p)·C) -> (B, C, *[g·p for g in grid])."""
    b, nd = tokens.shape[0], len(grid)
    x = tokens.reshape([b, *grid] + [patch] * nd + [channels])  # (B, g1.., p1.., C)
    order = [0, 2 * nd + 1]
    for i in range(nd):
        order += [1 + i, 1 + nd + i]
    return x.permute(order).reshape([b, channels] + [g * patch for g in grid])


def random_masking(batch: int, length: int, mask_ratio: float, device: torch.device,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random subset by argsort of uniform noise (MAE).

    Returns keep_idx (B, L_keep), mask (B, L) with 1 = masked, ids_restore (B, L) that undoes the shuffle.
    """
    n_keep = max(1, int(round(length * (1 - mask_ratio))))
    noise = torch.rand(batch, length, device=device, generator=generator)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    keep_idx = ids_shuffle[:, :n_keep]
    mask = torch.ones(batch, length, device=device)
    mask[:, :n_keep] = 0
    return keep_idx, torch.gather(mask, 1, ids_restore), ids_restore
