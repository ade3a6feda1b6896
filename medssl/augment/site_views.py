"""Site views: what changes between scanners and sites, as batched random ops on (B, C, *spatial) tensors.

Two effects the default views lack, so that an encoder learns to ignore them (whether it does is measured on
external sets in benchmarks/bench_label_efficiency.py, not assumed):

- a smooth multiplicative bias field, exp of a random polynomial of degree 3 in the normalised coordinates
  (the receive-coil inhomogeneity MR shows between sites; the form of MONAI's RandBiasField, drawn per sample
  on the batch's device);
- a lower resolution: the view is averaged down by a random factor and resampled back (thicker slices /
  coarser matrix, with the partial-volume blur that comes with it).

Contrast changes between sites are the views' gamma_range and intensity gain (views.random_intensity).
Plain arguments, not the config, so the ops are usable outside medssl; `site_views(x, cfg)` applies what the
config turns on.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def _monomials(spatial: list[int], degree: int, device, dtype) -> torch.Tensor:
    """(M, *spatial) products x^a y^b (z^c) with 1 <= a+b(+c) <= degree, coordinates in [-1, 1]."""
    nd = len(spatial)
    axes = []
    for axis, n in enumerate(spatial):
        shape = [1] * nd
        shape[axis] = n
        axes.append(torch.linspace(-1, 1, n, device=device, dtype=dtype).view(shape))
    terms = []
    for powers in itertools.product(range(degree + 1), repeat=nd):
        if 1 <= sum(powers) <= degree:
            term = torch.ones(spatial, device=device, dtype=dtype)
            for coord, p in zip(axes, powers):
                term = term * coord ** p
            terms.append(term)
    return torch.stack(terms)


def random_bias_field(x: torch.Tensor, strength: float, degree: int = 3,
                      gen: torch.Generator | None = None) -> torch.Tensor:
    """x times exp(sum_k c_k m_k), c_k ~ U(-strength, strength) per sample; m_k the monomials up to `degree`."""
    b, spatial = x.shape[0], list(x.shape[2:])
    basis = _monomials(spatial, degree, x.device, x.dtype)  # (M, *spatial)
    coeffs = (torch.rand(b, basis.shape[0], device=x.device, generator=gen, dtype=x.dtype) * 2 - 1) * strength
    log_field = torch.tensordot(coeffs, basis, dims=1)  # (B, *spatial)
    return x * log_field.exp().unsqueeze(1)


def random_resolution(x: torch.Tensor, low: float, high: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """Each sample averaged down by a factor ~ U(low, high) (area: no aliasing) and resampled back
    (bilinear / trilinear) to its size. One interpolation pair per sample: the sizes differ by sample."""
    factors = (low + (high - low) * torch.rand(x.shape[0], generator=gen, device=x.device)).tolist()
    mode = "bilinear" if x.ndim == 4 else "trilinear"
    out = torch.empty_like(x)
    for i, factor in enumerate(factors):
        small = [max(1, round(n / factor)) for n in x.shape[2:]]
        coarse = F.interpolate(x[i:i + 1], size=small, mode="area")
        out[i:i + 1] = F.interpolate(coarse, size=list(x.shape[2:]), mode=mode, align_corners=False)
    return out


def site_views(x: torch.Tensor, cfg, gen: torch.Generator | None = None) -> torch.Tensor:
    """The site effects a ViewsConfig turns on (resolution first: a coarser scan, then its coil field)."""
    if cfg.resolution_range is not None and cfg.resolution_range[1] > 1:
        x = random_resolution(x, *cfg.resolution_range, gen=gen)
    if cfg.bias_field:
        x = random_bias_field(x, cfg.bias_field, gen=gen)
    return x
