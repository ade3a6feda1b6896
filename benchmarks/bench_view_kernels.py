"""Do medssl's CPU view kernels (augment/views_cpu.py) earn their place? Each against torch's own route, same run.

Resampling: trilinear_by_rows (3D through torch's 2D sampler) vs F.grid_sample on medssl's broadcast
affine_grid and on F.affine_grid. Blur: blur_by_taps (shifted multiply-adds) vs blur_by_matmul (banded GEMM,
the accelerator route) and a grouped separable F.conv3d. Then the whole default view set (ViewsConfig())
with each route. Inputs: 96^3 crops of real anatomy (bench_views.cached_volume), one sample at a time as
make_views runs them on a CPU, and a batch of 8. Rounds interleaved, best and median reported.

    python benchmarks/bench_view_kernels.py --rounds 5 --json benchmarks/results/bench_view_kernels.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from bench_views import CROP, cached_volume, pick_crops  # noqa: E402

from medssl.augment import views  # noqa: E402
from medssl.augment.views_cpu import blur_by_taps, gaussian_taps, trilinear_by_rows  # noqa: E402
from medssl.config import ViewsConfig  # noqa: E402


def grid_sample_medssl_grid(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = views.affine_grid(theta, list(x.shape[2:]))
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def grid_sample_torch_grid(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """F.affine_grid wants theta in (x, y, z) order: reverse medssl's array-axis rows and columns."""
    order = [2, 1, 0]
    xyz = torch.cat([theta[:, order][:, :, order], theta[:, order, 3:]], dim=2)  # (B, 3, 4)
    grid = F.affine_grid(xyz, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def blur_by_conv(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian as three grouped F.conv3d (one group per sample), edges replicated."""
    b, c = x.shape[:2]
    weights = gaussian_taps(sigma, radius, x.dtype).repeat_interleave(c, 0)  # (B C, K)
    out = x.reshape(1, b * c, *x.shape[2:])
    for axis in range(3):
        shape = [b * c, 1, 1, 1, 1]
        shape[2 + axis] = 2 * radius + 1
        pad = [0] * 6
        pad[2 * (2 - axis):2 * (2 - axis) + 2] = [radius, radius]
        out = F.conv3d(F.pad(out, pad, mode="replicate"), weights.view(shape), groups=b * c)
    return out.reshape(x.shape)


RESAMPLE = {"trilinear_by_rows": trilinear_by_rows, "grid_sample + medssl affine_grid": grid_sample_medssl_grid,
            "grid_sample + F.affine_grid": grid_sample_torch_grid}
BLUR = {"blur_by_taps": blur_by_taps, "blur_by_matmul": views.blur_by_matmul, "blur_by_conv3d": blur_by_conv}


def check_equal(x: torch.Tensor, cfg: ViewsConfig) -> dict:
    """Largest difference of each route from torch's reference (grid_sample on F.affine_grid; the GEMM blur)."""
    theta = views.random_affine(x, cfg, torch.Generator().manual_seed(1))
    ref = grid_sample_torch_grid(x, theta)
    out = {name: float((fn(x, theta) - ref).abs().max()) for name, fn in RESAMPLE.items()}
    sigma = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(2))
    ref = views.blur_by_matmul(x, sigma, 3)
    out.update({name: float((fn(x, sigma, 3) - ref).abs().max()) for name, fn in BLUR.items()})
    return out


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e3  # ms per call


def variants(x1: torch.Tensor, x8: torch.Tensor, cfg: ViewsConfig, reps: int) -> dict:
    theta1 = views.random_affine(x1, cfg, torch.Generator().manual_seed(0))
    theta8 = views.random_affine(x8, cfg, torch.Generator().manual_seed(0))
    sigma1, sigma8 = torch.rand(1), torch.rand(8)
    out = {}
    for name, fn in RESAMPLE.items():
        out[f"resample, 1 sample: {name}"] = lambda f=fn: timed(lambda: f(x1, theta1), reps)
        out[f"resample, batch 8: {name}"] = lambda f=fn: timed(lambda: f(x8, theta8), max(1, reps // 4))
    for name, fn in BLUR.items():
        out[f"blur, 1 sample: {name}"] = lambda f=fn: timed(lambda: f(x1, sigma1, 3), reps)
        out[f"blur, batch 8: {name}"] = lambda f=fn: timed(lambda: f(x8, sigma8, 3), max(1, reps // 4))
    routes = {"medssl CPU kernels (rows + taps)": (trilinear_by_rows, blur_by_taps),
              "torch only (grid_sample + conv3d blur)": (grid_sample_medssl_grid, blur_by_conv),
              "torch only (grid_sample + GEMM blur)": (grid_sample_medssl_grid, views.blur_by_matmul)}
    for name, (resample, blur) in routes.items():
        out[f"default views, two per crop, batch 8 (ms per crop): {name}"] = (
            lambda r=resample, b=blur: _views_ms(x8, cfg, r, b, max(1, reps // 4)))
    return out


def _views_ms(x: torch.Tensor, cfg: ViewsConfig, resample, blur, reps: int) -> float:
    """make_views as training runs it, with the resampling and blur kernels swapped in."""
    gen = torch.Generator().manual_seed(0)

    def apply_affine(v, theta):
        return resample(v, theta.to(v.dtype))

    def gaussian_blur(v, sigma, max_sigma=None):
        return blur(v, sigma, max(1, int(np.ceil(3 * max_sigma))))
    with mock.patch.object(views, "apply_affine", apply_affine), \
            mock.patch.object(views, "gaussian_blur", gaussian_blur):
        per_batch = timed(lambda: (views.make_views(x, cfg, gen), views.make_views(x, cfg, gen)), reps)
    return per_batch / x.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=8, help="timed calls per variant per round (1 sample)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cfg, vol = ViewsConfig(), cached_volume()
    x8 = pick_crops(vol, 8, np.random.default_rng(0)).float()  # (8, 1, 96, 96, 96)
    x1 = x8[:1].clone()
    result = dict(bench="view_kernels", cpus=os.cpu_count(), torch=torch.__version__, crop=CROP,
                  views="ViewsConfig() (default)", max_abs_difference=check_equal(x8[:2], cfg), rows=[])
    for threads in args.threads:
        torch.set_num_threads(threads)
        runs = variants(x1, x8, cfg, args.reps)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):  # interleaved: a busy moment on a shared CPU hits every variant
            for name, run in runs.items():
                times[name].append(run())
        for name, values in times.items():
            row = dict(threads=threads, variant=name, best_ms=round(min(values), 2),
                       median_ms=round(statistics.median(values), 2))
            result["rows"].append(row)
            print(f"{threads} thr  {name:<90} best {row['best_ms']:8.2f} ms  median {row['median_ms']:8.2f} ms")
    result["load_average"] = os.getloadavg()
    print(json.dumps(result["max_abs_difference"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
