"""A MONAI ResNet run as a sparse CNN on a masked input, SparK-style (Tian et al. 2023), 2D and 3D.

SparK's point: a CNN sees a masked image as an image with holes, and dense convolutions fill the holes in
(each conv spreads visible features, biases and BatchNorm shifts into them), so masked modelling leaks and the
statistics it learns differ from those of unmasked images at fine-tuning. Sparse convolution computes only at
visible positions; here it is emulated without a sparse-conv library: the input is masked, every conv /
max-pool output is multiplied by the keep mask at its own resolution, and BatchNorm normalises with statistics
over the visible positions only. A masked position therefore stays exactly zero at every level.

The encoder's own modules are used (same weights, same BatchNorm running statistics), so what SparK trains is
the encoder that pretraining saves and fine-tuning loads.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class MaskPyramid:
    """The keep mask (B, 1, *grid), 1 = visible, resampled to any feature-map size and cached per size.

    Finer than the grid: nearest (each patch's voxels). Coarser: max-pool (a voxel covering any visible patch is
    visible; it then sees only the visible part of its receptive field, the rest being zeros).
    """

    def __init__(self, keep: torch.Tensor):
        self.keep, self.cache = keep, {}

    def at(self, size) -> torch.Tensor:
        size = tuple(int(s) for s in size)
        if size not in self.cache:
            grid = self.keep.shape[2:]
            pooled = F.adaptive_max_pool3d if len(grid) == 3 else F.adaptive_max_pool2d
            m = pooled(self.keep, [min(s, g) for s, g in zip(size, grid)])
            self.cache[size] = F.interpolate(m, size=size, mode="nearest") if tuple(m.shape[2:]) != size else m
        return self.cache[size]


def sparse_batch_norm(bn: _BatchNorm, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """BatchNorm of x (B, C, *S) with statistics over the visible positions (keep (B, 1, *S) in {0, 1}) only;
    running statistics updated as nn.BatchNorm does (unbiased variance, momentum or cumulative average), and
    summed over ranks for an nn.SyncBatchNorm under torch.distributed. Output zero where keep is 0."""
    if bn.training or not bn.track_running_stats:
        mean, var = _visible_moments(bn, x, keep)  # (C,) each, at least float32
    else:
        mean, var = bn.running_mean, bn.running_var
    if bn.affine:  # one multiply-add over the map: per-channel scale and shift folded first
        scale = bn.weight * torch.rsqrt(var + bn.eps)
        shift = bn.bias - mean * scale
    else:
        scale = torch.rsqrt(var + bn.eps)
        shift = -mean * scale
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = torch.addcmul(shift.view(shape), _wide(x), scale.view(shape))
    return (y * keep).to(x.dtype)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 under autocast would lose the statistics), float64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _visible_moments(bn: _BatchNorm, x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [0] + list(range(2, x.ndim))
    xf, m = _wide(x), _wide(keep)
    # count, sum, sum of squares: one reduction (and one all-reduce under SyncBatchNorm) for all three
    visible = xf * m
    sums = torch.stack([m.sum(dims).expand(x.shape[1]), visible.sum(dims), (visible * xf).sum(dims)])  # (3, C)
    if isinstance(bn, nn.SyncBatchNorm) and dist.is_available() and dist.is_initialized():
        from torch.distributed.nn.functional import all_reduce  # differentiable, unlike dist.all_reduce
        sums = all_reduce(sums)
    n = sums[0].clamp(min=1)
    mean = sums[1] / n
    var = (sums[2] / n - mean * mean).clamp(min=0)  # biased: what normalises
    if bn.training and bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked += 1
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            unbiased = var * n / (n - 1).clamp(min=1)
            bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor)
            bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), factor)
    return mean, var


def _sparse(module: nn.Module, x: torch.Tensor, masks: MaskPyramid) -> torch.Tensor:
    """One conv / pool / norm of the encoder, its output emptied again at masked positions."""
    if isinstance(module, _BatchNorm):
        return sparse_batch_norm(module, x, masks.at(x.shape[2:]))
    if isinstance(module, nn.Sequential):  # the ResNet's downsample shortcut: conv then norm
        for child in module:
            x = _sparse(child, x, masks)
        return x
    out = module(x)
    return out * masks.at(out.shape[2:]).to(out.dtype)


def _sparse_block(block: nn.Module, x: torch.Tensor, masks: MaskPyramid) -> torch.Tensor:
    """MONAI's ResNetBlock (conv1-2) or ResNetBottleneck (conv1-3) forward, each conv and norm made sparse."""
    n = 3 if hasattr(block, "conv3") else 2
    h = x
    for i in range(1, n + 1):
        h = _sparse(getattr(block, f"bn{i}"), _sparse(getattr(block, f"conv{i}"), h, masks), masks)
        if i < n:
            h = block.act(h)  # ReLU(0) = 0: the holes stay empty
    residual = x if block.downsample is None else _sparse(block.downsample, x, masks)
    return block.act(h + residual)


def sparse_resnet_features(encoder: nn.Module, x: torch.Tensor,
                           keep: torch.Tensor | MaskPyramid) -> list[torch.Tensor]:
    """x (B, C, *S), keep (B, 1, *grid) with 1 = visible patch (or its MaskPyramid, to share the resampled
    masks with a decoder) -> the stem (1/2) and layer1-4 (1/4 .. 1/32) feature maps, each zero at its masked
    positions. With keep all ones this is the encoder's own forward up to its pooling (tests/test_spark.py)."""
    masks = keep if isinstance(keep, MaskPyramid) else MaskPyramid(keep.to(x.dtype))
    e = encoder
    h = e.act(_sparse(e.bn1, _sparse(e.conv1, x * masks.at(x.shape[2:]), masks), masks))  # (B, C0, S/2)
    feats = [h]
    if not e.no_max_pool:
        h = _sparse(e.maxpool, h, masks)
    for layer in (e.layer1, e.layer2, e.layer3, e.layer4):
        for block in layer:
            h = _sparse_block(block, h, masks)
        feats.append(h)
    return feats
