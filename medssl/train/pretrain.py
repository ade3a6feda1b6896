"""Self-supervised pretraining of one encoder: dataset + method + loop + tracking, ending in an encoder file.

    encoder_path = run_pretraining(cfg, cache, image_ids, groups, out_dir, tracker)

Single process: `make_loader`'s endless, resumable stream. Under torchrun: the sharded per-epoch order of
`distributed.sharded_loader` (each rank a disjoint share). Re-running with the same out_dir resumes from the
newest checkpoint in out_dir/checkpoints; a finished run only re-saves and re-logs the encoder.
"""
from __future__ import annotations

from pathlib import Path

import torch

from medssl.config import PretrainConfig
from medssl.tracking.base import NullTracker
from medssl.train import checkpoint as ckpt
from medssl.train.determinism import deterministic_algorithms
from medssl.train.distributed import barrier, init_distributed, sharded_loader
from medssl.train.loop import seed_everything, train

# contrastive positives -> the CropDataset pairing that provides them ("views": two views of one crop)
PAIR_BY = {"views": None, "patient": "patient", "study": "study"}


def default_device(local_rank: int = 0) -> torch.device:
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def run_pretraining(cfg: PretrainConfig, cache, image_ids, groups: dict | None, out_dir: Path, tracker,
                    probe=None, spatial_dims: int = 3, device: torch.device | str | None = None,
                    keep_checkpoints: int = 2, log_checkpoint: bool = True, view_examples: int = 4,
                    manifest_digest: str | None = None, sync_batchnorm: bool = False) -> Path:
    """Pretrain cfg.encoder with cfg.ssl on crops of the cached `image_ids`; return the encoder file.

    groups: {image_id: patient (or study) id} for patient/study positives. probe: an OnlineProbe (or any
    `probe(encoder, device) -> dict`) run every cfg.train.probe_every steps. Only rank 0 logs and writes.
    """
    from medssl.train.device_crops import DeviceCrops, device_crop_workers, use_device_crops
    from medssl.train.loaders import CropDataset, CropPositions
    from medssl.models.encoders import save_encoder
    from medssl.ssl import build_method, method_name

    info, out_dir, t = init_distributed(), Path(out_dir), cfg.train
    device = torch.device(device) if device is not None else default_device(info.local_rank)
    positives = cfg.ssl.contrastive.positives if cfg.ssl.contrastive is not None else "views"
    dataset = CropDataset(cache, list(image_ids), cfg.crop, spatial_dims, seed=t.seed,
                          pair_by=PAIR_BY[positives], groups=groups if PAIR_BY[positives] else None)
    seed_everything(t.seed)  # the same initial weights on every rank and every fresh run
    method = build_method(cfg, spatial_dims)
    if info.rank == 0:
        _log_setup(tracker, cfg, dataset, spatial_dims, method_name(cfg), info.world_size)
        _log_views(tracker, dataset, cfg, view_examples)
    # images on the device: the loader hands out crop positions (the same random draws), the device cuts them
    prepare, source, workers = None, dataset, t.workers
    on_device = use_device_crops(t.device_crops, cache, dataset.ids, cfg.crop, spatial_dims, device)
    if on_device:
        prepare = DeviceCrops.load(cache, dataset.ids, cfg.crop, spatial_dims, device).fill
        source, workers = CropPositions(dataset), device_crop_workers(t.workers, device)
    if info.rank == 0:  # what "auto" decided, next to the setting, for whoever compares runs' speed
        tracker.set_tags({"medssl.crops_cut_on": device.type if on_device else "cpu loader"})
    factory = _loader_factory(source, t, info.world_size, workers)
    # stored in every checkpoint; a resume must match all of it but the resumable train settings (loop.py)
    config = {"pretrain": cfg.model_dump(mode="json", exclude={"train"}), "spatial_dims": spatial_dims,
              "manifest_digest": manifest_digest}
    with deterministic_algorithms(t.deterministic):
        result = train(method, factory, t, out_dir, tracker if info.rank == 0 else NullTracker(), device,
                       probe=probe, keep_checkpoints=keep_checkpoints, config=config,
                       sync_batchnorm=sync_batchnorm, prepare=prepare)
    path = out_dir / "encoder.pt"
    if info.rank == 0:
        save_encoder(path, method.encoder, cfg.encoder, spatial_dims, cfg.crop,
                     pretrain_run_id=getattr(tracker, "active_run_id", None), manifest_digest=manifest_digest,
                     method=method_name(cfg), steps=result["step"])
        _log_outputs(tracker, path, result, log_checkpoint)
    barrier()  # the encoder file exists before any rank returns its path
    return path


def _log_outputs(tracker, encoder_path: Path, result: dict, log_checkpoint: bool) -> None:
    """The encoder as artifact "encoder/encoder.pt" (what load_encoder("runs:/<id>/encoder/encoder.pt") reads)
    and the final checkpoint (weights + optimizer state: large, hence optional)."""
    tracker.log_artifact(encoder_path, "encoder")
    if log_checkpoint and result["checkpoint"]:
        tracker.log_artifact(result["checkpoint"], "checkpoints")
    if result["loss"] is not None:
        tracker.log_metrics({"pretrain/final_loss": result["loss"]}, step=result["step"])
    # what a run made of its budget (train.budget_minutes): the steps and the training seconds, resumes included
    tracker.log_metrics({"pretrain/steps": result["step"], "pretrain/train_s": result.get("elapsed_s", 0.0)},
                        step=result["step"])


def _loader_factory(dataset, t, world_size: int, workers: int):
    if world_size > 1:
        return sharded_loader(dataset, t.batch_size, t.seed, workers)
    from medssl.train.loaders import make_loader

    def factory(epoch: int, position: int):
        # one endless stream (epochs=None): the epoch stays 0 and `position` is the micro-batch to start at
        return make_loader(dataset, t.batch_size, shuffle=True, seed=t.seed, workers=workers,
                           start_step=position, epochs=None)
    return factory


def _log_setup(tracker, cfg: PretrainConfig, dataset, spatial_dims: int, method: str, world_size: int) -> None:
    t = cfg.train
    tracker.log_params({**cfg.model_dump(mode="json"), "spatial_dims": spatial_dims, "method": method,
                        "images": len(dataset), "world_size": world_size,
                        "effective_batch": t.batch_size * t.accumulate * world_size})
    tracker.set_tags({"medssl.method": method})


def _log_views(tracker, dataset, cfg: PretrainConfig, n: int) -> None:
    """A figure of a few crops and two random views of each (middle slice of 3D crops): what the encoder sees.
    Its own generator: drawing the figure does not move the training random streams."""
    if n <= 0:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from medssl.augment.views import make_views

    crops = torch.stack([dataset[i]["image"] for i in range(min(n, len(dataset)))])  # (n, C, *crop)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    columns = {"crop": crops, "view 1": make_views(crops, cfg.views, gen), "view 2": make_views(crops, cfg.views, gen)}
    fig, axes = plt.subplots(len(crops), 3, figsize=(6, 2 * len(crops)), squeeze=False)
    for col, (title, images) in enumerate(columns.items()):
        for row, image in enumerate(images):
            plane = image[0] if image.ndim == 3 else image[0, ..., image.shape[-1] // 2]  # (X, Y)
            lo, hi = float(crops[row].min()), float(crops[row].max())  # the crop's range: shows intensity changes
            axes[row, col].imshow(plane.T.float().numpy(), cmap="gray", origin="lower", vmin=lo, vmax=hi)
            axes[row, col].set_axis_off()
        axes[0, col].set_title(title)
    tracker.log_figure(fig, "views/examples.png")
    plt.close(fig)
