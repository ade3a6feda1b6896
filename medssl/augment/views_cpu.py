"""CPU kernels for medssl.views: the same values as the accelerator path, computed the way a CPU is fast.

On a GPU the views use F.grid_sample and a banded-matrix blur (matmul units). On a CPU torch's 3D grid_sample
is a scalar loop and the banded GEMM does n / (2 radius + 1) times the needed multiply-adds (96 vs 7 a voxel
for a 96^3 crop), so there: a 3D trilinear resample through the vectorised 2D sampler, and a blur of shifted
multiply-adds. Tests hold both routes equal; benchmarks/bench_view_kernels.py measures each against torch's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_taps(sigma: torch.Tensor, radius: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, 2 radius + 1) normalised Gaussian weights, one row per sample's sigma."""
    taps = torch.arange(-radius, radius + 1, device=sigma.device).to(dtype)
    weights = torch.exp(-0.5 * (taps / sigma.to(dtype).clamp(min=1e-3).view(-1, 1)) ** 2)
    return weights / weights.sum(1, keepdim=True)


def _source_coord(theta: torch.Tensor, axis: int, spatial: list[int], scale: float, offset: float):
    """scale * (affine_grid source coordinate along array `axis`) + offset, as (B, D, H, 1) + (B, 1, 1, W)."""
    b = theta.shape[0]
    c = [(torch.arange(n, dtype=theta.dtype, device=theta.device) * 2 + 1) / n - 1 for n in spatial]
    t = (theta[:, axis] * scale).view(b, 4, 1, 1, 1)
    return t[:, 3] + offset + t[:, 0] * c[0].view(-1, 1, 1) + t[:, 1] * c[1].view(-1, 1), t[:, 2] * c[2]


def trilinear_by_rows(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """CPU trilinear resampling of x (B, 1, D, H, W), same values as F.grid_sample (zeros, align_corners=False).

    torch's 3D grid_sample on CPU is a scalar loop; its 2D one is vectorised. Stack the z slices into one
    tall image, each slice followed by two zero rows and a zero slice at both ends, and add a second channel
    that views the same memory one slice further on: one bilinear sample at row (z0 + 1) * slot + y then
    yields the bilinear values of slices z0 and z0 + 1, and a lerp by z's fraction completes the trilinear
    value. The zero rows and slices make 'zeros' padding exact (y and z are clamped into them); normalising a
    ~9.5k-row coordinate in float32 moves a sample by up to ~1e-3 voxel.
    """
    b, _, d, h, w = x.shape
    slot, spatial = h + 2, [d, h, w]
    rows = (d + 3) * slot  # slot 0: zero slice z = -1; slot d + 1: z = d; slot d + 2: channel 1 overrun
    tall = x.new_zeros(b, d + 3, slot, w)
    tall[:, 1:d + 1, :h] = x[:, 0]
    z = torch.add(*_source_coord(theta, 0, spatial, d / 2, (d - 1) / 2)).clamp_(-1, d)  # voxel units
    z0 = z.floor().clamp_(max=d - 1)  # z == d: slice d - 1 with weight 0, slice d (zero) with weight 1
    frac = z.sub_(z0)
    k, c = 2 / (rows - slot), (2 * slot + 1) / (rows - slot) - 1  # row r -> normalised (2 r + 1) / height - 1
    planes = x.new_empty(2, b, d, h, w)  # (x, row): planar, which the 2D sampler loads fastest
    torch.add(*_source_coord(theta, 2, spatial, 1.0, 0.0), out=planes[0])
    y = torch.add(*_source_coord(theta, 1, spatial, h / 2 * k, (h - 1) / 2 * k + c)).clamp_(c - k, c + h * k)
    torch.add(y, z0, alpha=slot * k, out=planes[1])
    # the 2D sampler parallelises over its batch: split one sample's rows over the threads, reading one image
    parts = torch.get_num_threads() if b == 1 and d * h % torch.get_num_threads() == 0 else 1
    image = tall.view(b, rows, w).as_strided((b * parts, 2, rows - slot, w),
                                              (0 if parts > 1 else rows * w, slot * w, w, 1))
    grid = planes.view(2, b * parts, d * h // parts, w).permute(1, 2, 3, 0)
    pair = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return torch.lerp(pair[:, 0], pair[:, 1], frac.view(b * parts, -1, w)).view(x.shape)


def blur_by_taps(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """The same separable Gaussian as the banded GEMM: per axis, 2 radius + 1 multiply-adds of shifted views."""
    b, nd = x.shape[0], x.ndim - 2
    weights = gaussian_taps(sigma, radius, x.dtype).view(b, -1, *[1] * (nd + 1))  # (B, K, 1, ...)
    out = x
    for axis in range(2, 2 + nd):
        pad = [0, 0] * nd
        pad[2 * (x.ndim - 1 - axis):2 * (x.ndim - axis)] = [radius, radius]  # F.pad lists the last axis first
        padded, n = F.pad(out, pad, mode="replicate"), out.shape[axis]
        out = padded.narrow(axis, 0, n) * weights[:, 0]
        for tap in range(1, 2 * radius + 1):
            out.addcmul_(padded.narrow(axis, tap, n), weights[:, tap])
    return out
