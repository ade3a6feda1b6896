"""The method-agnostic SSL training loop: plain PyTorch, resumable to the exact step.

    result = train(method, loader_factory, cfg, out_dir, tracker, device)

`method` is any nn.Module whose `forward(batch)` returns {"loss": scalar tensor, ...diagnostics}; the loop
never branches on which method it is. `loader_factory(epoch, position)` returns an iterable over the batches of
`epoch` starting at batch `position` (see distributed.sharded_loader): on resume the loop asks for the saved
(epoch, position) and no skipped sample is read. A step is one optimizer update over `cfg.accumulate`
micro-batches; `position` counts micro-batches.
"""
from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from medssl.config import TrainConfig
from medssl.errors import TrainingError
from medssl.train import checkpoint as ckpt
from medssl.train.batches import BatchStream, move_to_device, batch_samples
from medssl.train.distributed import DistInfo, all_mean, barrier, current, gather_objects, wrap_model
from medssl.ui import TrainProgress
from medssl.train.schedule import WarmupCosine, build_optimizer, warmup_cosine
from medssl.ui import console

# train settings a resumed run may change (longer, another lr or schedule, other logging or speed settings);
# every other stored setting (data order, model, method, views, crop, ...) must match the checkpoint's
RESUMABLE = {"steps", "lr", "warmup_steps", "grad_clip", "checkpoint_every", "keep_checkpoints", "log_every",
             "probe_every", "workers", "compile", "device_crops", "precision"}


@dataclass
class _Window:
    """Sums since the last log line."""
    steps: int = 0
    loss: float = 0.0
    samples: int = 0
    wait_s: float = 0.0
    start: float = field(default_factory=time.perf_counter)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_for(cfg: TrainConfig, device: torch.device):
    """bf16 autocast on CUDA ("auto") or when asked ("bf16"); fp32 otherwise. bf16 needs no loss scaler."""
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"
                                       and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _has_conv2d(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def train(method: nn.Module, loader_factory: Callable, cfg: TrainConfig, out_dir: Path, tracker,
          device: torch.device | str, on_step: Callable[[int, dict], None] | None = None, probe=None,
          keep_checkpoints: int = 2, config: dict | None = None, sync_batchnorm: bool = False,
          prepare: Callable[[dict], dict] | None = None) -> dict:
    """Train `method` for cfg.steps optimizer steps, resuming from the newest checkpoint in out_dir/checkpoints.

    on_step(step, metrics) runs on every rank after every step (metrics: loss, lr, grad_norm); `probe(encoder,
    device) -> dict` runs on rank 0 every cfg.probe_every steps; `config` is stored in each checkpoint;
    sync_batchnorm: BatchNorm statistics over all GPUs under DDP (CUDA only; PyTorch has no CPU kernel);
    prepare(batch) runs on each micro-batch once it is on the device (e.g. DeviceCrops.fill: positions -> crops).
    Returns {"step", "loss", "checkpoint", "resumed_from"}.
    """
    device, out_dir, info = torch.device(device), Path(out_dir), current()
    seed_everything(cfg.seed + 1000 * info.rank)
    if sync_batchnorm and info.enabled and device.type == "cuda":
        nn.SyncBatchNorm.convert_sync_batchnorm(method)  # in place below the root; same Parameter objects
    channels_last = device.type == "cuda" and _has_conv2d(method)
    method.to(device, memory_format=torch.channels_last) if channels_last else method.to(device)
    optimizer = build_optimizer(method, cfg, device)
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, cfg.steps)
    if info.rank == 0:
        ckpt.remove_partial_saves(out_dir)
    barrier()  # every rank sees the same newest checkpoint (rank 0 may just have written one)
    settings = {"train": cfg.model_dump(mode="json"), "world_size": info.world_size, **(config or {})}
    step, data, resumed = _resume(out_dir, method, optimizer, scheduler, cfg, info, settings)
    model = wrap_model(method, device)
    model = torch.compile(model) if cfg.compile else model
    method.train()
    run = _Run(method, model, optimizer, scheduler, cfg, out_dir, tracker, device, info, probe,
               keep_checkpoints, settings, channels_last, prepare)
    stream = BatchStream(loader_factory, data["epoch"], data["position"])
    loss = run.loop(stream, step, on_step)
    barrier()  # the final checkpoint exists before any rank returns
    last = ckpt.latest_checkpoint(out_dir)
    return {"step": cfg.steps, "loss": loss, "checkpoint": str(last) if last else None,
            "resumed_from": resumed}


@dataclass
class _Run:
    method: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    cfg: TrainConfig
    out_dir: Path
    tracker: object
    device: torch.device
    info: DistInfo
    probe: object
    keep: int
    config: dict
    channels_last: bool
    prepare: Callable[[dict], dict] | None = None

    def loop(self, stream: BatchStream, step: int, on_step) -> float | None:
        cfg, main, loss = self.cfg, self.info.rank == 0, None
        window = _Window()
        with TrainProgress(cfg.steps, step, enabled=main, world_size=self.info.world_size) as bar:
            while step < cfg.steps:
                metrics = self.guarded_step(stream, step + 1, window)
                step, loss = step + 1, metrics["loss"]
                bar.advance(window, loss)
                if on_step is not None:
                    on_step(step, metrics)
                if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                    self.save(step, stream)
                if main and (step % cfg.log_every == 0 or step == cfg.steps):
                    self.tracker.log_metrics(self.window_metrics(window, metrics), step=step)
                    window = _Window()
                if main and self.probe is not None and cfg.probe_every and step % cfg.probe_every == 0:
                    self.run_probe(step)
        return loss

    def guarded_step(self, stream: BatchStream, step: int, window: _Window) -> dict:
        try:
            return self.step(stream, step, window)
        except torch.cuda.OutOfMemoryError:
            raise TrainingError(
                f"GPU out of memory at step {step} with train.batch_size={self.cfg.batch_size}",
                where=f"pretrain.train.batch_size / pretrain.crop ({self.device})",
                fix="lower pretrain.train.batch_size (raise train.accumulate to keep the effective batch) or "
                    "use a smaller pretrain.crop") from None

    def step(self, stream: BatchStream, step: int, window: _Window) -> dict:
        """One optimizer update over cfg.accumulate micro-batches; raises before the update if non-finite."""
        cfg, ddp = self.cfg, self.model is not self.method and hasattr(self.model, "no_sync")
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        for micro in range(cfg.accumulate):
            batch, waited = stream.next()
            window.wait_s += waited
            window.samples += batch_samples(batch)
            batch = move_to_device(batch, self.device, self.channels_last)
            if self.prepare is not None:
                batch = self.prepare(batch)
            # DDP: all-reduce gradients only on the last micro-batch
            sync = nullcontext() if micro == cfg.accumulate - 1 or not ddp else self.model.no_sync()
            with sync:
                with autocast_for(cfg, self.device):
                    out = self.model(batch)
                (out["loss"] / cfg.accumulate).backward()
            _add_scalars(sums, out)
        grad_norm = nn.utils.clip_grad_norm_(self.method.parameters(), cfg.grad_clip or math.inf)
        # one host sync per step: the loss (mean over micro-batches and ranks) and the gradient norm
        loss, norm = torch.stack([sums["loss"] / cfg.accumulate, grad_norm.float()]).tolist()
        loss = all_mean(loss, self.device)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self.fail_non_finite(step, loss, norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        window.steps, window.loss = window.steps + 1, window.loss + loss
        extras = {k: v / cfg.accumulate for k, v in sums.items() if k != "loss"}
        return {"loss": loss, "lr": lr, "grad_norm": norm, "extras": extras}

    def fail_non_finite(self, step: int, loss: float, norm: float):
        last = ckpt.latest_checkpoint(self.out_dir)
        kept = f"the last good checkpoint is kept: {last}" if last else "no checkpoint had been written yet"
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        raise TrainingError(
            f"training stopped: {what} became non-finite (loss={loss}, grad norm={norm}) at step {step}; "
            f"the weights were not updated with it, and {kept}",
            where=str(self.out_dir),
            fix="lower pretrain.train.lr (e.g. by 2-10x), enable or lower pretrain.train.grad_clip, "
                "raise train.warmup_steps, or use train.precision=fp32; rerunning resumes from the checkpoint")

    def save(self, step: int, stream: BatchStream) -> None:
        # every rank's RNG, so each resumes its own random views (collective: all ranks must call it)
        rng_ranks = gather_objects(ckpt.capture_rng()) if self.info.enabled else None
        if self.info.rank != 0:
            return
        data = {"seed": self.cfg.seed, "epoch": stream.epoch, "position": stream.position}
        ckpt.save_checkpoint(ckpt.checkpoint_path(self.out_dir, step), model=self.method,
                             optimizer=self.optimizer, scheduler=self.scheduler, scaler=None, step=step,
                             data=data, config=self.config, rng_ranks=rng_ranks)
        ckpt.prune_checkpoints(self.out_dir, self.keep)

    def window_metrics(self, window: _Window, metrics: dict) -> dict:
        elapsed = max(time.perf_counter() - window.start, 1e-9)
        out = {"train/loss": window.loss / max(window.steps, 1), "train/lr": metrics["lr"],
               "train/grad_norm": metrics["grad_norm"],
               "train/samples_per_s": window.samples * self.info.world_size / elapsed,
               "train/data_wait": window.wait_s / elapsed}
        out.update({f"train/{k}": float(v) for k, v in metrics["extras"].items()})
        if self.device.type == "cuda":
            out["train/gpu_max_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return out

    def run_probe(self, step: int) -> None:
        # the probe runs after the checkpoint of this step: it must leave the random streams as it found them
        rng = ckpt.capture_rng()
        try:
            scores = self.probe(self.method.encoder, self.device)
        except (RuntimeError, ValueError) as err:  # a broken probe must not stop (or lose) the training run
            console.print(f"[yellow]probe failed at step {step}, training goes on:[/] {err}")
            return
        finally:
            ckpt.restore_rng(rng)
        self.tracker.log_metrics({f"probe/{k}": v for k, v in scores.items()}, step=step)
        console.print(f"step {step}: probe " + ", ".join(f"{k}={v:.3f}" for k, v in scores.items()))


def _add_scalars(sums: dict, out: dict) -> None:
    """Detached sums of the scalar outputs (loss + diagnostics), kept on the device: no sync per micro-batch."""
    for key, value in out.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.detach().float().reshape(())
        elif not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        sums[key] = sums[key] + value if key in sums else value


def _resume(out_dir: Path, method, optimizer, scheduler, cfg: TrainConfig, info: DistInfo, settings: dict):
    """(step, data position, path) of the newest readable checkpoint, restored into the objects; else zeros.
    An unreadable newest file is skipped for the one before it (nothing good is lost because of it)."""
    for path in reversed(ckpt.list_checkpoints(out_dir)):
        try:
            state = ckpt.load_checkpoint(path)
        except TrainingError as err:
            if info.rank == 0:
                console.print(f"[yellow]skipping a checkpoint that cannot be read:[/] {err.what} ({path})")
            continue
        _check_compatible(state.get("config", {}), settings, path)
        ckpt.restore_training_state(state, method, optimizer, scheduler, None, str(path))
        _apply_schedule_settings(scheduler, optimizer, cfg)
        ranks = state.get("rng_ranks")
        ckpt.restore_rng(ranks[info.rank] if ranks and len(ranks) == info.world_size else state["rng"])
        if info.rank == 0:
            console.print(f"resuming from step {state['step']} ({path})")
        return state["step"], state["data"], str(path)
    return 0, {"seed": cfg.seed, "epoch": 0, "position": 0}, None


def _check_compatible(saved: dict, now: dict, path: Path) -> None:
    """Refuse to resume under settings other than the checkpoint's, except the RESUMABLE train ones. Without
    this, a changed view set or method would 'resume' a finished run, train no step, and hand back the old
    encoder as if it were the new one."""
    saved, now = _fixed_settings(saved), _fixed_settings(now)
    changed = [f"{k}: {saved.get(k)} -> {now.get(k)}" for k in sorted(set(saved) | set(now))
               if saved.get(k) != now.get(k)]
    if changed:
        raise TrainingError("cannot resume: settings changed since the checkpoint (" + "; ".join(changed[:6])
                            + ("; ..." if len(changed) > 6 else "") + ")", where=str(path),
                            fix=f"restore those settings to resume, or move {path.parent} away (or use a new "
                                "output folder) to start over with the new ones")


def _fixed_settings(config: dict, prefix: str = "") -> dict:
    """Dotted keys of the stored settings that a resume must keep (world_size reads 'processes')."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_fixed_settings(value, f"{name}."))
        elif not (prefix.endswith("train.") and key in RESUMABLE):
            out["processes" if name == "world_size" else name] = value
    return out


def _apply_schedule_settings(scheduler, optimizer, cfg: TrainConfig) -> None:
    """A resumed run follows the current train.lr / warmup_steps / steps (e.g. a lower lr after a NaN stop),
    not the ones saved in the scheduler; with unchanged settings this is a no-op."""
    scheduler.lr_lambdas = [WarmupCosine(cfg.warmup_steps, cfg.steps) for _ in optimizer.param_groups]
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)
