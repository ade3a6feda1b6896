"""Data path benchmark: cached 3D volume -> two augmented 96^3 views per crop, ready for the model (CPU).

Baseline: the MONAI tutorial's CPU transform chain (Project-MONAI/tutorials self_supervised_pretraining/
vit_unetr_ssl: RandSpatialCropSamplesd x2, CopyItemsd, per view OneOf(RandCoarseDropoutd x2) and
RandCoarseShuffled), one process per core. medssl: the loader only slices crops out of the cached array; the
views are made batched by medssl.views (here on the CPU; in training on the GPU). Same run, rounds interleaved
so load on a shared machine hits both alike; the best round of each is reported with the median.

    python benchmarks/bench_views.py --rounds 3 --json bench_views.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time

import numpy as np
import torch

from medssl.config import ViewsConfig
from medssl.views import make_views

VOLUME = (180, 180, 150)  # the tutorial's cached CT volume after 2 mm resampling
CROP = 96
# tutorial-class work (index flips, gain/bias, one cutout box) vs the full default and CT view sets
LIGHT = ViewsConfig(rotate_degrees=0, scale_range=(1, 1), crop_jitter=0, gamma_range=(1, 1), noise_std=0,
                    blur_sigma=(0, 0), cutout_fraction=0.1)
CT = ViewsConfig(crop_jitter=0.2, intensity_scale=0.05, intensity_shift=0.05, gamma_range=(0.9, 1.1),
                 noise_std=0.03, cutout_fraction=0.1)


def cached_volume() -> np.ndarray:
    """Real anatomy (nibabel's T1) resampled to the tutorial's cached size: (1, 180, 180, 150) float32."""
    import nibabel
    path = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "anatomical.nii")
    vol = torch.from_numpy(np.asarray(nibabel.load(path).get_fdata(), dtype=np.float32))
    vol = torch.nn.functional.interpolate(vol[None, None], size=VOLUME, mode="trilinear")[0]
    return ((vol - vol.min()) / (vol.max() - vol.min())).numpy()


def tutorial_chain(crop: int = CROP):
    from monai.transforms import (Compose, CopyItemsd, OneOf, RandCoarseDropoutd, RandCoarseShuffled,
                                  RandSpatialCropSamplesd)

    def view(key):
        return [OneOf([RandCoarseDropoutd(keys=[key], prob=1.0, holes=6, spatial_size=5, dropout_holes=True,
                                          max_spatial_size=32),
                       RandCoarseDropoutd(keys=[key], prob=1.0, holes=6, spatial_size=20, dropout_holes=False,
                                          max_spatial_size=64)]),
                RandCoarseShuffled(keys=[key], prob=0.8, holes=10, spatial_size=8)]
    return Compose([RandSpatialCropSamplesd(keys=["image"], roi_size=(crop,) * 3, random_size=False,
                                            num_samples=2),
                    CopyItemsd(keys=["image"], times=2, names=["gt_image", "image_2"]),
                    *view("image"), *view("image_2")])


def _tutorial_worker(args) -> float:
    calls, seed = args
    torch.set_num_threads(1)
    from monai.utils import set_determinism
    set_determinism(seed)
    chain, item = tutorial_chain(), {"image": cached_volume()}
    chain(dict(item))  # warm-up
    start = time.perf_counter()
    for _ in range(calls):
        chain(dict(item))
    return 2 * calls / (time.perf_counter() - start)  # two crops per call


def tutorial_rate(workers: int, calls: int) -> float:
    """Crops/s of `workers` processes, each timed on its own (as DataLoader workers would run)."""
    if workers == 1:
        return _tutorial_worker((calls, 0))
    with mp.get_context("spawn").Pool(workers) as pool:
        return sum(pool.map(_tutorial_worker, [(calls, i) for i in range(workers)]))


def pick_crops(vol: np.ndarray, n: int, rng: np.random.Generator) -> torch.Tensor:
    """What a CropDataset worker does: slice n random 96^3 crops out of the cached array -> (n, 1, 96, 96, 96)."""
    corners = [[int(rng.integers(0, s - CROP + 1)) for s in vol.shape[1:]] for _ in range(n)]
    crops = [vol[:, x:x + CROP, y:y + CROP, z:z + CROP] for x, y, z in corners]
    return torch.from_numpy(np.stack(crops))


def medssl_rate(vol: np.ndarray, cfg: ViewsConfig, threads: int, batch: int, batches: int) -> float:
    torch.set_num_threads(threads)
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    make_views(pick_crops(vol, batch, rng), cfg, gen)  # warm-up
    start = time.perf_counter()
    for _ in range(batches):
        x = pick_crops(vol, batch, rng)  # (B, 1, 96, 96, 96)
        v1, v2 = make_views(x, cfg, gen), make_views(x, cfg, gen)  # two views, ready for the model
    return batch * batches / (time.perf_counter() - start)


def pick_rate(vol: np.ndarray, batch: int, batches: int) -> float:
    """The CPU work left in medssl's design when the views run on the accelerator: slicing crops."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(batches):
        pick_crops(vol, batch, rng)
    return batch * batches / (time.perf_counter() - start)


def variants(args) -> dict:
    vol = cached_volume()
    out = {f"tutorial MONAI chain, {w} proc": (lambda w=w: tutorial_rate(w, args.calls)) for w in (1, 2)}
    out["medssl crop pick only (views on GPU), 1 thr"] = lambda: pick_rate(vol, args.batch, 4 * args.batches)
    for name, cfg in (("light", LIGHT), ("default", ViewsConfig()), ("ct", CT)):
        for threads in (1, 2):
            out[f"medssl views '{name}', {threads} thr"] = (
                lambda c=cfg, t=threads: medssl_rate(vol, c, t, args.batch, args.batches))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=6, help="tutorial chain calls per worker per round")
    parser.add_argument("--batch", type=int, default=8, help="medssl crops per batch")
    parser.add_argument("--batches", type=int, default=3, help="medssl batches per round")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args()
    runs = variants(args)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):  # interleaved: a busy moment on a shared CPU hits every variant
        for name, run in runs.items():
            rates[name].append(run())
    report(rates, args)


def report(rates: dict[str, list[float]], args) -> None:
    from rich.console import Console
    from rich.table import Table
    base = max(rates["tutorial MONAI chain, 1 proc"])
    base2 = max(rates["tutorial MONAI chain, 2 proc"])
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    table = Table(title=f"cached {VOLUME} -> two views of {CROP}^3 crops, {os.cpu_count()} CPU cores "
                        f"(load average {load})")
    for col in ("variant", "best crops/s", "median crops/s", "x tutorial 1 proc", "x tutorial 2 proc"):
        table.add_column(col, justify="right" if col != "variant" else "left")
    rows = []
    for name, values in rates.items():
        best, median = max(values), statistics.median(values)
        rows.append(dict(variant=name, best=round(best, 1), median=round(median, 1), rounds=values,
                         vs_tutorial_1proc=round(best / base, 2), vs_tutorial_2proc=round(best / base2, 2)))
        table.add_row(name, f"{best:.1f}", f"{median:.1f}", f"{best / base:.2f}", f"{best / base2:.2f}")
    Console().print(table)
    result = dict(bench="views", cpus=os.cpu_count(), load_average=os.getloadavg(), torch=torch.__version__, volume=VOLUME, crop=CROP,
                  batch=args.batch, rows=rows)
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
