"""End-to-end 3D pretraining benchmark on one GPU: the MONAI tutorial's recipe vs medssl's MAE.

Both variants train from cached 180x180x150 volumes, so the figure includes feeding the model:
  tutorial  ViTAutoEnc (ViT-B, 96^3, patch 16), fp32, Adam; its CPU transform chain in DataLoader workers
            (crops + coarse dropout/shuffle, benchmarks/bench_views.py); loss L1(recon(v1), gt) + CL * L1
  medssl    medssl's own stack: CropDataset positions -> images held on the GPU (data/device_crops.py) ->
            the method's batched views on the GPU -> train/loop.py (bf16 autocast, fused AdamW, clipping,
            warm-up/cosine, final checkpoint, optional torch.compile). MAE with a ViT-B encoder (MONAI blocks,
            SDPA), 4x384 decoder, mask 0.75. "medssl": the default view set; "medssl-maeviews":
            configs/views/mae.yaml
Reports samples/s, data-wait share (time blocked on the loader / step time), the views' time per batch
(eager, on their own; compiled into the step they cost less: compare with medssl-noviews), and
MFU (model FLOPs from torch.utils.flop_counter, views excluded, / step time / bf16 peak).

    python benchmarks/bench_pretrain_gpu.py --batch 256 --compile --json pretrain.json   # on a GPU
    python benchmarks/bench_pretrain_gpu.py --tiny                                     # CPU smoke check
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Dataset

# bf16 dense peaks from ../shared/ANCHORS.md (H200 measured there; H100 SXM datasheet)
PEAKS = {"H100": 989e12, "H200": 790e12}


class CachedCrops(Dataset):
    """Random crops of one in-memory cached volume; `chain` (optional) is the tutorial's CPU transform chain."""

    def __init__(self, volume: np.ndarray, crop: int, length: int, chain=None):
        self.volume, self.crop, self.length, self.chain = volume, crop, length, chain

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if self.chain is not None:  # two crops, each: image (view 1), image_2 (view 2), gt_image
            return {k: torch.stack([torch.as_tensor(s[k]) for s in self.chain({"image": self.volume})])
                    for k in ("image", "image_2", "gt_image")}
        rng = np.random.default_rng(i)
        x, y, z = (int(rng.integers(0, s - self.crop + 1)) for s in self.volume.shape[1:])
        return {"image": torch.from_numpy(self.volume[:, x:x + self.crop, y:y + self.crop, z:z + self.crop].copy())}


def volume(tiny: bool) -> np.ndarray:
    shape = (48, 48, 40) if tiny else (180, 180, 150)
    return np.random.default_rng(0).random((1, *shape), dtype=np.float32)


def tutorial_setup(args, device):
    from monai.losses import ContrastiveLoss
    from monai.networks.nets import ViTAutoEnc
    from bench_views import tutorial_chain  # the same chain bench_views.py times (script dir on sys.path)
    size, width = (32, 96) if args.tiny else (96, 768)
    model = ViTAutoEnc(in_channels=1, img_size=(size,) * 3, patch_size=(16,) * 3, proj_type="conv",
                       hidden_size=width, mlp_dim=4 * width, num_heads=4 if args.tiny else 12,
                       num_layers=2 if args.tiny else 12).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    l1, cl = torch.nn.L1Loss(), ContrastiveLoss(temperature=0.05)

    def loss_fn(batch):
        v1, v2, gt = (batch[k].flatten(0, 1) for k in ("image", "image_2", "gt_image"))  # (2·B, 1, S, S, S)
        r1, _ = model(v1)
        r2, _ = model(v2)
        recon = l1(r1, gt)
        return recon + cl(r1.flatten(1), r2.flatten(1)) * recon
    chain = tutorial_chain(size)
    return model, opt, loss_fn, CachedCrops(volume(args.tiny), size, 10 ** 6, chain), args.tutorial_batch // 2


# configs/views/mae.yaml (flips + gain/shift: MAE's own recipe uses almost no augmentation) vs the default
# view set (adds rotation/scale resampling, gamma, blur, noise): timed both ways, so the views' cost shows
MAE_VIEWS = Path(__file__).resolve().parents[1] / "configs" / "views" / "mae.yaml"
NO_VIEWS = dict(flip_prob=0, rotate_degrees=0, scale_range=(1, 1), crop_jitter=0, intensity_scale=0,
                intensity_shift=0, gamma_range=(1, 1), noise_std=0, blur_sigma=(0, 0))


class ArrayCache:
    """The has/get/shape side of medssl.data.cache.VolumeCache over in-memory float16 arrays."""

    def __init__(self, arrays: dict):
        self.arrays = arrays

    def has(self, image_id):
        return image_id in self.arrays

    def get(self, image_id):
        return self.arrays[image_id]

    def shape(self, image_id):
        return self.arrays[image_id].shape


class Recorder:
    """A tracker that keeps the loop's window metrics (samples/s, data wait) in memory."""

    def __init__(self):
        self.windows = []

    def log_metrics(self, metrics, step=None):
        self.windows.append(dict(metrics))

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def medssl_run(name: str, args, device) -> dict:
    """medssl's own training stack: CropDataset positions -> images on the device (DeviceCrops) -> the
    method's on-device views -> the loop (bf16 autocast, fused AdamW, clipping, schedule, checkpoint, compile)."""
    import tempfile
    from medssl.config import EncoderConfig, MaskedConfig, PretrainConfig, SSLConfig, TrainConfig, ViewsConfig
    from medssl.train.device_crops import DeviceCrops, device_crop_workers
    from medssl.train.loaders import CropDataset, CropPositions, make_loader
    from medssl.ssl import build_method
    from medssl.train.loop import seed_everything, train
    size = 32 if args.tiny else 96
    enc = (EncoderConfig(name="vit", patch_size=16, hidden_size=96, num_layers=2, num_heads=4, mlp_dim=384)
           if args.tiny else EncoderConfig(name="vit"))
    masked = MaskedConfig(mask_ratio=0.75, decoder_dim=64 if args.tiny else 384, decoder_depth=1 if args.tiny else 4,
                          decoder_heads=2 if args.tiny else 6)
    views = {"medssl-maeviews": ViewsConfig.model_validate(yaml.safe_load(MAE_VIEWS.read_text())),
             "medssl-noviews": ViewsConfig(**NO_VIEWS)}.get(name, ViewsConfig())
    steps = args.warmup + args.steps
    train_cfg = TrainConfig(steps=steps, batch_size=args.batch, lr=1.5e-4, warmup_steps=args.warmup,
                            checkpoint_every=steps, log_every=args.warmup, compile=args.compile,
                            device_crops="on", seed=0)
    cfg = PretrainConfig(encoder=enc, ssl=SSLConfig(masked=masked), views=views, crop=[size] * 3, train=train_cfg)
    base = volume(args.tiny).astype(np.float16)
    cache = ArrayCache({f"vol{i}": np.flip(base, axis=1 + i % 3).copy() * (1 + 0.1 * i) for i in range(args.volumes)})
    dataset = CropDataset(cache, list(cache.arrays), cfg.crop, 3, seed=0)
    bank = DeviceCrops.load(cache, dataset.ids, cfg.crop, 3, device)
    seed_everything(0)
    method = build_method(cfg, 3).to(device)
    # endless stream: one epoch of a few volumes would be a short batch (FLOPs and view time per full batch)
    positions = next(iter(make_loader(CropPositions(dataset), args.batch, shuffle=True, seed=0, epochs=None)))
    positions = {k: v.to(device) for k, v in positions.items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        flops = model_flops(method, lambda b: method(b)["loss"], bank.fill(positions))
    views_ms = time_views(method.views, bank, positions["image_at"], device)

    def factory(epoch, position):  # as train/pretrain.py: a worker draws the next positions during the step
        return make_loader(CropPositions(dataset), args.batch, shuffle=True, seed=0, start_step=position,
                           epochs=None, workers=device_crop_workers(0, device))
    stamps, tracker = [], Recorder()
    with tempfile.TemporaryDirectory() as out_dir:
        train(method, factory, train_cfg, out_dir, tracker, device, prepare=bank.fill,
              on_step=lambda step, metrics: stamps.append((time.perf_counter(), metrics["loss"])))
    per_step = (stamps[-1][0] - stamps[args.warmup - 1][0]) / args.steps  # steady state, checkpoint excluded
    waits = [w["train/data_wait"] for w in tracker.windows[1:]] or [tracker.windows[-1]["train/data_wait"]]
    return dict(variant=name, device=device_name(device), batch_crops=args.batch,
                samples_per_s=round(args.batch / per_step, 1), step_ms=round(per_step * 1e3, 1),
                data_wait_share=round(float(np.mean(waits)), 4),
                views_ms_eager=round(views_ms, 2),
                gflop_per_step=float(f"{flops / 1e9:.4g}"), tflops=float(f"{flops / per_step / 1e12:.3g}"),
                mfu=float(f"{flops / per_step / args.peak:.3g}"), loss=round(float(stamps[-1][1]), 4),
                amp_bf16=device.type == "cuda", compiled=bool(args.compile),
                peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if device.type == "cuda" else None)


def time_views(views, bank, image_at, device, reps: int = 10) -> float:
    """ms for cutting a batch of crops on the device and making one view of each (MAE's input)."""
    from medssl.augment.views import make_views
    make_views(bank.gather(image_at), views)  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        make_views(bank.gather(image_at), views)
    _sync(device)
    return (time.perf_counter() - start) / reps * 1e3


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def model_flops(model, loss_fn, batch) -> float:
    """FLOPs of one forward + backward, views switched off (they are not model work)."""
    from torch.utils.flop_counter import FlopCounterMode
    from medssl.config import ViewsConfig
    saved = getattr(model, "views", None)
    if saved is not None:
        model.views = ViewsConfig(**NO_VIEWS)
    counter = FlopCounterMode(display=False)
    with counter:
        loss_fn(batch).backward()
    if saved is not None:
        model.views = saved
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def run_tutorial(args, device) -> dict:
    torch.manual_seed(0)
    model, opt, loss_fn, dataset, batch = tutorial_setup(args, device)
    loader = DataLoader(dataset, batch_size=batch, num_workers=args.workers, pin_memory=device.type == "cuda",
                        persistent_workers=args.workers > 0, prefetch_factor=4 if args.workers else None)
    batches = iter(loader)
    to_device = lambda b: {k: v.to(device, non_blocking=True) for k, v in b.items()}  # noqa: E731
    flops = model_flops(model, loss_fn, to_device(next(batches)))
    wait = step_time = 0.0
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        data = to_device(next(batches))  # blocked on workers + host->device copy
        got = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(data)
        loss.backward()
        opt.step()
        _sync(device)  # step boundaries must be real to split data wait from compute
        if step >= args.warmup:
            wait, step_time = wait + got - start, step_time + time.perf_counter() - start
    samples = args.steps * batch * 2  # 2 crops per loader item
    per_step = step_time / args.steps
    return dict(variant="tutorial", device=device_name(device), batch_crops=samples // args.steps,
                samples_per_s=round(samples / step_time, 1), step_ms=round(per_step * 1e3, 1),
                data_wait_share=round(wait / step_time, 3), gflop_per_step=float(f"{flops / 1e9:.4g}"),
                tflops=float(f"{flops / per_step / 1e12:.3g}"), mfu=float(f"{flops / per_step / args.peak:.3g}"),
                loss=round(float(loss), 4), amp_bf16=False, compiled=False,
                peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if device.type == "cuda" else None)


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def default_peak(device) -> float:
    name = device_name(device)
    return next((peak for key, peak in PEAKS.items() if key in name), PEAKS["H100"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke check: 32^3 crops, 2-layer ViTs")
    parser.add_argument("--variants", default="tutorial,medssl-maeviews,medssl",
                        help="tutorial, medssl (default view set), medssl-maeviews (flips + gain/shift, MAE-style), "
                             "medssl-noviews (the model and loop alone: the views' cost by difference)")
    parser.add_argument("--volumes", type=int, default=8, help="cached volumes held on the device")
    parser.add_argument("--batch", type=int, default=None, help="medssl crops per step (default 256; tiny 2)")
    parser.add_argument("--tutorial-batch", type=int, default=None,
                        help="crops per tutorial step (default 8 as in the tutorial; fp32 ViTAutoEnc needs ~92 GiB "
                             "at 32)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile the medssl method")
    parser.add_argument("--peak", type=float, default=None, help="bf16 dense peak FLOP/s (H100 989e12, H200 790e12)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    defaults = (("batch", 256, 2), ("tutorial_batch", 8, 2), ("steps", 30, 2), ("warmup", 10, 1), ("workers", 8, 0))
    for key, full, tiny in defaults:
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)
    args.peak = args.peak or default_peak(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    results = []
    for name in args.variants.split(","):
        try:
            results.append(run_tutorial(args, device) if name == "tutorial" else medssl_run(name, args, device))
        except Exception as err:  # report the failure, go on with the next variant
            results.append(dict(variant=name, error=repr(err)[:300]))
        print(json.dumps(results[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(bench="pretrain_gpu", peak=args.peak, torch=torch.__version__, results=results), f, indent=1)


if __name__ == "__main__":
    main()
