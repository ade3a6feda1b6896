"""Batched, on-device random views for SSL: (B, C, H, W) or (B, C, D, H, W) in, same shape/dtype/device out.

Every random parameter is drawn per sample with torch on the batch's device, so the whole batch is augmented
by a handful of kernels instead of B Python-level transform chains. Geometry (crop jitter/zoom, rotation,
scale, flips) is one affine matrix per sample applied in a single resampling pass.

On a CPU the same views take a cheaper route where it pays: large samples one at a time (_sample_by_sample),
a 3D trilinear resample through torch's vectorised 2D sampler and the blur as shifted multiply-adds
(views_cpu.py, which keep their place by measurement: benchmarks/bench_view_kernels.py). Given the same draws
both routes give the same views (tests/test_views.py). Even so, a CPU makes the full default set far more
slowly than a GPU training step consumes crops: the views belong on the training device (figures in
benchmarks/results/).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medssl.config import ViewsConfig
from medssl.augment.site_views import site_views
from medssl.augment.views_cpu import blur_by_taps, gaussian_taps, trilinear_by_rows


def _uniform(n: int, low: float, high: float, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, device=x.device, generator=gen)


def _rotation(angles: torch.Tensor, nd: int) -> torch.Tensor:
    """(B, 1 or 3) radians -> (B, nd, nd) rotation matrices (3D: Z·Y·X Euler composition)."""
    def plane(a, i, j):
        m = torch.eye(nd, device=a.device).repeat(a.shape[0], 1, 1)
        c, s = torch.cos(a), torch.sin(a)
        m[:, i, i], m[:, i, j], m[:, j, i], m[:, j, j] = c, -s, s, c
        return m
    if nd == 2:
        return plane(angles[:, 0], 0, 1)
    return plane(angles[:, 0], 0, 1) @ plane(angles[:, 1], 0, 2) @ plane(angles[:, 2], 1, 2)


def needs_resampling(cfg: ViewsConfig) -> bool:
    """Rotation, scale or zoom need interpolation; flips alone are exact index reversals."""
    return cfg.rotate_degrees > 0 or cfg.crop_jitter > 0 or tuple(cfg.scale_range) != (1.0, 1.0)


def random_flips(x: torch.Tensor, prob: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample, per-axis flips without interpolation (exact index reversal)."""
    b, nd = x.shape[0], x.ndim - 2
    flips = torch.rand(b, nd, device=x.device, generator=gen) < prob  # (B, nd)
    return flip_samples(x, flips, per_sample=x.device.type == "cpu")


def flip_samples(x: torch.Tensor, flips: torch.Tensor, per_sample: bool) -> torch.Tensor:
    """Flip sample i along the spatial axes where flips[i] (B, nd) is True.

    per_sample (CPU): one flip + copy per sample, two passes over memory. Otherwise ONE gather whose index
    along each axis is reversed for the flipped samples: no host sync and no data-dependent Python, so it
    stays inside a torch.compile graph on an accelerator.
    """
    b, c, *spatial = x.shape
    nd = len(spatial)
    if per_sample:
        out = torch.empty_like(x)
        for i, row in enumerate(flips.tolist()):
            axes = [a for a in range(nd) if row[a]]
            out[i] = x[i].flip([1 + a for a in axes]) if axes else x[i]
        return out
    along = []
    for axis, n in enumerate(spatial):
        forward = torch.arange(n, device=x.device)
        along.append(torch.where(flips[:, axis, None], n - 1 - forward, forward))  # (B, n)
    return gather_windows(x, torch.arange(b, device=x.device), along)


def gather_windows(source: torch.Tensor, rows: torch.Tensor, along: list[torch.Tensor],
                   last: torch.Tensor | None = None) -> torch.Tensor:
    """ONE gather of B windows: out[i, c, j1, j2..] = source[rows[i], c, along[0][i, j1], along[1][i, j2], ..
    (, last[i])]. Broadcast index tensors, so no (B, C, *window) index is ever built.
    source (N, C, *axes); rows (B,); along: one (B, n_a) index per axis; last (B,): a trailing axis (a slice)."""
    b, nd = rows.shape[0], len(along)
    ones = [1] * nd
    index = [rows.view(b, 1, *ones), torch.arange(source.shape[1], device=source.device).view(1, -1, *ones)]
    for axis, positions in enumerate(along):
        shape = [b, 1] + ones
        shape[2 + axis] = positions.shape[1]
        index.append(positions.view(shape))
    if last is not None:
        index.append(last.view(b, 1, *ones))
    return source[tuple(index)]


def random_affine(x: torch.Tensor, cfg: ViewsConfig, gen: torch.Generator | None = None) -> torch.Tensor:
    """(B, nd, nd+1) matrices mapping output to input coordinates in [-1, 1] (affine_grid convention)."""
    b, nd = x.shape[0], x.ndim - 2
    n_angles = 1 if nd == 2 else 3
    angles = torch.rand(b, n_angles, device=x.device, generator=gen) * 2 - 1
    rot = _rotation(angles * math.radians(cfg.rotate_degrees), nd)  # (B, nd, nd)
    # zoom-in (crop jitter) and scale both shrink/grow the sampled region: sampled extent = zoom / scale
    zoom = _uniform(b, 1 - cfg.crop_jitter, 1.0, x, gen)
    scale = _uniform(b, *cfg.scale_range, x, gen)
    extent = (zoom / scale).view(b, 1, 1)
    flips = torch.rand(b, nd, device=x.device, generator=gen) < cfg.flip_prob
    signs = 1.0 - 2.0 * flips.float()  # (B, nd): -1 flips that axis
    linear = rot * extent * signs.unsqueeze(1)  # flip the output axis (column), then rotate and zoom
    # shift the sampled window anywhere it still fits inside the crop (only possible when zoomed in)
    room = (1 - extent.view(b, 1)).clamp(min=0)
    shift = (torch.rand(b, nd, device=x.device, generator=gen) * 2 - 1) * room  # (B, nd)
    return torch.cat([linear, shift.unsqueeze(-1)], dim=-1)


def affine_grid(theta: torch.Tensor, spatial: list[int]) -> torch.Tensor:
    """F.affine_grid for a theta in array-axis order, built by broadcasting (B, *spatial, nd).

    F.affine_grid multiplies a (B, N, nd+1) base grid by theta with a small-k matmul, which on CPU costs as
    much as the trilinear sampling itself; a voxel's source position is separable in the output axes, so
    nd broadcast adds per coordinate give the same grid at memory speed.
    """
    b, nd = theta.shape[0], len(spatial)
    coords = [(torch.arange(n, device=theta.device, dtype=theta.dtype) * 2 + 1) / n - 1 for n in spatial]
    grid = torch.empty(b, *spatial, nd, device=theta.device, dtype=theta.dtype)
    for row in range(nd):  # source coordinate along array axis `row`
        acc = theta[:, row, nd].view(b, *[1] * nd)
        for col in range(nd):
            shape = [1] * (nd + 1)
            shape[1 + col] = spatial[col]
            term = theta[:, row, col].view(b, *[1] * nd) * coords[col].view(shape)
            if col == nd - 1:  # the one full-size add writes straight into the grid
                torch.add(acc, term, out=grid[..., nd - 1 - row])  # grid_sample wants (x, y, z): reversed
            else:
                acc = acc + term
    return grid


def apply_affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Trilinear/bilinear resampling of x (B, C, *spatial) by theta (B, nd, nd+1), zeros outside."""
    if x.device.type == "cpu" and x.ndim == 5 and x.shape[1] == 1:
        return trilinear_by_rows(x, theta.to(x.dtype))
    grid = affine_grid(theta.to(x.dtype), list(x.shape[2:]))
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_intensity(x: torch.Tensor, cfg: ViewsConfig, gen: torch.Generator | None = None,
                     inplace: bool = False) -> torch.Tensor:
    """Gamma (on the sample's own min-max range), then gain and bias; inplace reuses x's memory."""
    gamma_on, gain_on = tuple(cfg.gamma_range) != (1.0, 1.0), bool(cfg.intensity_scale or cfg.intensity_shift)
    if not (gamma_on or gain_on):
        return x
    b, nd = x.shape[0], x.ndim - 2
    shape = (b,) + (1,) * (nd + 1)
    scale, shift = torch.ones(shape, device=x.device), torch.zeros(shape, device=x.device)
    if gamma_on:
        lo, hi = math.log(cfg.gamma_range[0]), math.log(cfg.gamma_range[1])
        gamma = torch.exp(_uniform(b, lo, hi, x, gen)).view(shape)  # log-uniform: 0.8 and 1.25 equally likely
        # amin and amax, not aminmax: torch 2.x's CPU aminmax over a dim is much slower than the two of them
        low, high = x.flatten(1).amin(1).view(shape), x.flatten(1).amax(1).view(shape)
        scale = (high - low).clamp(min=1e-6)  # gamma needs [0, 1]; map back to the sample's own range
        # x - low first: the minimum must map to exactly 0, as pow(0 + rounding, 0.5) is visibly not 0
        x = torch.sub(x, low, out=x if inplace else None).div_(scale).clamp_(0, 1).pow_(gamma)
        shift, inplace = low, True  # x is now our own tensor
    if gain_on:
        gain = 1 + _uniform(b, -cfg.intensity_scale, cfg.intensity_scale, x, gen).view(shape)
        bias = _uniform(b, -cfg.intensity_shift, cfg.intensity_shift, x, gen).view(shape)
        scale, shift = scale * gain, shift * gain + bias
    # back from [0, 1], then gain and bias, in one pass (x * scale + shift), written into x when allowed
    return torch.addcmul(shift, x, scale, out=x if inplace else None)


def _blur_matrices(sigma: torch.Tensor, n: int, radius: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, n, n) banded matrices: row i holds sample b's Gaussian taps around i, edges clamped (replicate)."""
    b = sigma.shape[0]
    weights = gaussian_taps(sigma, radius, dtype).unsqueeze(1).expand(b, n, -1)  # (B, n, K)
    taps = torch.arange(-radius, radius + 1, device=sigma.device)
    index = (torch.arange(n, device=sigma.device)[:, None] + taps).clamp(0, n - 1).expand(b, n, -1)
    return torch.zeros(b, n, n, device=sigma.device, dtype=dtype).scatter_add_(2, index, weights.contiguous())


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float | None = None) -> torch.Tensor:
    """Separable blur with a per-sample sigma (B,), edges replicated, taps out to 3 sigma of the largest."""
    # the kernel radius from the configured maximum, not sigma.max(): reading a GPU value would sync
    radius = max(1, math.ceil(3 * (float(sigma.max()) if max_sigma is None else max_sigma)))
    return (blur_by_taps if x.device.type == "cpu" else blur_by_matmul)(x, sigma, radius)


def blur_by_matmul(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Accelerators: one batched GEMM per axis with a banded (n, n) matrix per sample.

    No padding copy or permute, and it runs on the matmul units. On CPU the GEMM does n / (2 radius + 1)
    times the needed work (96 vs 7 multiply-adds a voxel): there blur_by_taps is faster.
    """
    b, c, *spatial = x.shape
    out = x
    for axis, n in enumerate(spatial):
        mat = _blur_matrices(sigma, n, radius, x.dtype)  # (B, n, n)
        before, after = c * math.prod(spatial[:axis]), math.prod(spatial[axis + 1:])
        if after == 1:  # last axis: contract from the right, (B, rest, n) @ (B, n, n)^T
            out = torch.matmul(out.reshape(b, before, n), mat.transpose(1, 2))
        else:  # (B, 1, n, n) @ (B, before, n, after)
            out = torch.matmul(mat.unsqueeze(1), out.reshape(b, before, n, after))
    return out.reshape(x.shape)


def random_cutout(x: torch.Tensor, fraction: float, gen: torch.Generator | None = None,
                  inplace: bool = False) -> torch.Tensor:
    """Zero one box per sample covering `fraction` of the volume (edge = fraction**(1/nd) of each edge)."""
    b, nd = x.shape[0], x.ndim - 2
    edges = [max(1, round(size * fraction ** (1 / nd))) for size in x.shape[2:]]
    starts = [(torch.rand(b, device=x.device, generator=gen) * (size - edge + 1)).long()
              for size, edge in zip(x.shape[2:], edges)]  # nd tensors (B,)
    if x.device.type == "cpu":  # a slice assignment per sample touches only the box
        out = x if inplace else x.clone()
        corners = torch.stack(starts, 1).tolist()
        for i, corner in enumerate(corners):
            out[(i, slice(None)) + tuple(slice(c, c + e) for c, e in zip(corner, edges))] = 0
        return out
    inside = torch.ones(b, *x.shape[2:], dtype=torch.bool, device=x.device)
    for axis, (size, edge, start) in enumerate(zip(x.shape[2:], edges, starts)):
        pos = torch.arange(size, device=x.device)
        hit = (pos >= start[:, None]) & (pos < start[:, None] + edge)  # (B, size)
        view = [b] + [1] * nd
        view[1 + axis] = size
        inside = inside & hit.view(view)
    return x.masked_fill(inside.unsqueeze(1), 0.0)  # on an accelerator: one kernel instead of B


def make_views(x: torch.Tensor, cfg: ViewsConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """One random view per sample of x (B, C, *spatial); an all-off config returns x unchanged."""
    if x.ndim not in (4, 5):
        raise ValueError(f"make_views expects (B, C, H, W) or (B, C, D, H, W), got shape {tuple(x.shape)}")
    if not _sample_by_sample(x, cfg):
        return _views(x, cfg, generator)
    out = torch.empty_like(x)  # written in place: torch.cat of the samples' views would copy them all again
    for i in range(x.shape[0]):
        out[i:i + 1] = _views(x[i:i + 1], cfg, generator)
    return out


def _sample_by_sample(x: torch.Tensor, cfg: ViewsConfig) -> bool:
    """CPU views of large samples (64^3 and up) that resample or blur are faster made one sample at a time.

    A sample's few-MB temporaries stay in cache and their memory is reused, where a batch's 30-90 MB ones
    stream through DRAM and fresh pages at every step. Below 2^18 voxels the per-sample Python overhead wins,
    and the cheap light views (flips, gain, cutout) are faster batched.
    """
    heavy = needs_resampling(cfg) or cfg.blur_sigma[1] > 0
    return x.device.type == "cpu" and x.shape[0] > 1 and x[0].numel() >= 2 ** 18 and heavy


def _views(x: torch.Tensor, cfg: ViewsConfig, generator: torch.Generator | None) -> torch.Tensor:
    dtype, b = x.dtype, x.shape[0]
    out = x.float()  # fp16 cache crops: do the arithmetic in fp32, hand back the caller's dtype
    if needs_resampling(cfg):  # flips folded into the same single resampling pass
        out = apply_affine(out, random_affine(out, cfg, generator))
    elif cfg.flip_prob > 0:
        out = random_flips(out, cfg.flip_prob, generator)
    owned = out is not x  # after the first new tensor, later steps write in place (fewer 96^3 passes)
    out = random_intensity(out, cfg, generator, inplace=owned)
    out = site_views(out, cfg, generator)  # bias field, lower resolution: off unless configured
    owned = out is not x
    if cfg.blur_sigma[1] > 0:
        sigma = _uniform(b, *cfg.blur_sigma, out, generator)  # (B,)
        out, owned = gaussian_blur(out, sigma, max_sigma=cfg.blur_sigma[1]), True
    if cfg.noise_std > 0:
        std = _uniform(b, 0.0, cfg.noise_std, out, generator).view(b, *[1] * (out.ndim - 1))
        noise = torch.randn(out.shape, device=out.device, generator=generator)
        out, owned = (out.addcmul_(noise, std) if owned else torch.addcmul(out, noise, std)), True
    if cfg.cutout_fraction > 0:
        out = random_cutout(out, cfg.cutout_fraction, generator, inplace=owned)
    return out.to(dtype)


def two_views(x: torch.Tensor, cfg: ViewsConfig, generator: torch.Generator | None = None):
    return make_views(x, cfg, generator), make_views(x, cfg, generator)


class RandomViews(nn.Module):
    """nn.Module wrapper (no parameters): `views(x)` inside a method's forward."""

    def __init__(self, cfg: ViewsConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return make_views(x, self.cfg, generator)
