"""Data path benchmark: cached 3D volume -> two augmented 96^3 views per crop, ready for the model.

Baseline: the MONAI tutorial's CPU transform chain (Project-MONAI/tutorials self_supervised_pretraining/
vit_unetr_ssl: RandSpatialCropSamplesd x2, CopyItemsd, per view OneOf(RandCoarseDropoutd x2) and
RandCoarseShuffled), one process per core. medssl on the CPU: the loader only slices crops out of the cached
array and medssl.views makes the views batched. medssl on a device (--device cuda): the cached volume is put
on the device once, each batch's crops are one gather there and the views are made there, as in training.
Same run, rounds interleaved so load on a shared machine hits every variant alike; the best round of each is
reported with the median.

    python benchmarks/bench_views.py --rounds 3 --json bench_views.json
    python benchmarks/bench_views.py --device cuda --batch 64 256 --with-tutorial --tutorial-procs 1 16
    python benchmarks/bench_views.py --device cpu --gpu-style --rounds 1 --batch 2 --batches 1   # check
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
from medssl.augment.views import make_views

VOLUME = (180, 180, 150)  # the tutorial's cached CT volume after 2 mm resampling
CROP = 96
# tutorial-class work (index flips, gain/bias, one cutout box) vs the full default and CT view sets
LIGHT = ViewsConfig(rotate_degrees=0, scale_range=(1, 1), crop_jitter=0, gamma_range=(1, 1), noise_std=0,
                    blur_sigma=(0, 0), cutout_fraction=0.1)
CT = ViewsConfig(crop_jitter=0.2, intensity_scale=0.05, intensity_shift=0.05, gamma_range=(0.9, 1.1),
                 noise_std=0.03, cutout_fraction=0.1)
VIEW_SETS = (("light", LIGHT), ("default", ViewsConfig()), ("ct", CT))


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


def gather_crops(bank, n: int, gen: torch.Generator) -> torch.Tensor:
    """n random 96^3 crops of the one image in `bank` (medssl.data.device_crops.DeviceCrops, as in training)
    -> (n, C, 96, 96, 96): corners drawn on the bank's device, one gather kernel, no host round trip."""
    frame = bank.frame
    room = torch.tensor([s - CROP + 1 for s in frame.shape[2:]], device=frame.device)
    starts = (torch.rand(n, 3, device=frame.device, generator=gen) * room).long()  # (n, 3)
    head = torch.tensor([0, -1], device=frame.device).expand(n, 2)               # image 0, no axial slice
    return bank.gather(torch.cat([head, starts], dim=1))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels are queued asynchronously: wait for them before reading the clock
        torch.cuda.synchronize(device)


def device_rate(bank, cfg: ViewsConfig | None, batch: int, batches: int, warmup: int = 2) -> float:
    """Crops/s of gather + two views, everything on the bank's device; cfg None times the gather alone."""
    device = bank.frame.device
    gen = torch.Generator(device=device).manual_seed(0)

    def step():
        x = gather_crops(bank, batch, gen)  # (B, 1, 96, 96, 96)
        return x if cfg is None else (make_views(x, cfg, gen), make_views(x, cfg, gen))
    for _ in range(warmup):  # kernel selection, caching allocator growth
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        step()
    _sync(device)
    return batch * batches / (time.perf_counter() - start)


def tutorial_variants(args) -> dict:
    return {f"tutorial MONAI chain, {w} proc": (lambda w=w: tutorial_rate(w, args.calls))
            for w in args.tutorial_procs}


def cpu_variants(args) -> dict:
    vol = cached_volume()
    out = tutorial_variants(args)
    out["medssl crop pick only (views on GPU), 1 thr"] = lambda: pick_rate(vol, args.batch[0], 4 * args.batches)
    for name, cfg in VIEW_SETS:
        for threads in (1, 2):
            out[f"medssl views '{name}', {threads} thr"] = (
                lambda c=cfg, t=threads: medssl_rate(vol, c, t, args.batch[0], args.batches))
    return out


def device_variants(args) -> dict:
    from medssl.train.device_crops import DeviceCrops
    device = torch.device(args.device)
    volume = torch.from_numpy(cached_volume()).half().to(device)  # float16, as cached; uploaded once
    bank = DeviceCrops(volume[None], [CROP] * 3)                   # what training gathers from
    out = tutorial_variants(args) if args.with_tutorial else {}
    for batch in args.batch:
        out[f"medssl crop gather only, {device.type}, batch {batch}"] = (
            lambda b=batch: device_rate(bank, None, b, args.batches))
        for name, cfg in VIEW_SETS:
            out[f"medssl views '{name}', {device.type}, batch {batch}"] = (
                lambda c=cfg, b=batch: device_rate(bank, c, b, args.batches))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=6, help="tutorial chain calls per worker per round")
    parser.add_argument("--batch", type=int, nargs="+", default=None,
                        help="medssl crops per batch (default 8 on the CPU path, 64 256 on the device path)")
    parser.add_argument("--batches", type=int, default=None,
                        help="medssl timed batches per round (default 3 on the CPU path, 20 on the device path)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: crops and views made on the device")
    parser.add_argument("--gpu-style", action="store_true",
                        help="run the device path (volume resident, batched gather) on --device cpu: a check")
    parser.add_argument("--with-tutorial", action="store_true", help="device path: also time the tutorial")
    parser.add_argument("--tutorial-procs", type=int, nargs="+", default=[1, 2],
                        help="tutorial chain process counts, e.g. 1 16 to compare with a 16-core host")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args()
    on_device = args.device != "cpu" or args.gpu_style
    args.batch = args.batch or ([64, 256] if on_device else [8])
    args.batches = args.batches or (20 if on_device else 3)
    runs = device_variants(args) if on_device else cpu_variants(args)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):  # interleaved: a busy moment on a shared CPU hits every variant
        for name, run in runs.items():
            rates[name].append(run())
    report(rates, args)


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"


def report(rates: dict[str, list[float]], args) -> None:
    from rich.console import Console
    from rich.table import Table
    bases = {w: max(rates[f"tutorial MONAI chain, {w} proc"]) for w in args.tutorial_procs
             if f"tutorial MONAI chain, {w} proc" in rates}
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    table = Table(title=f"cached {VOLUME} -> two views of {CROP}^3 crops on {device_name(args.device)}, "
                        f"{os.cpu_count()} CPU cores (load average {load})")
    for col in ["variant", "best crops/s", "median crops/s"] + [f"x tutorial {w} proc" for w in bases]:
        table.add_column(col, justify="right" if col != "variant" else "left")
    rows = []
    for name, values in rates.items():
        best, median = max(values), statistics.median(values)
        ratios = {f"vs_tutorial_{w}proc": round(best / base, 2) for w, base in bases.items()}
        rows.append(dict(variant=name, best=round(best, 1), median=round(median, 1), rounds=values, **ratios))
        table.add_row(name, f"{best:.1f}", f"{median:.1f}", *[f"{r:.2f}" for r in ratios.values()])
    Console(width=150).print(table)  # one line per row in logs too, not an 80-column wrap
    result = dict(bench="views", device=device_name(args.device), cpus=os.cpu_count(),
                  load_average=os.getloadavg(), torch=torch.__version__, volume=VOLUME, crop=CROP,
                  batch=args.batch if len(args.batch) > 1 else args.batch[0], rows=rows)
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
