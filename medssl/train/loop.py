"""The method-agnostic SSL training loop: plain PyTorch, resumable to the exact step.

    result = train(method, loader_factory, cfg, out_dir, tracker, device)

`method` is any nn.Module whose `forward(batch)` makes its own random views and returns {"loss": scalar tensor,
...diagnostics}, and whose `after_step()` (medssl.ssl.base.SSLMethod) runs after each update; the loop never
branches on which method it is. A step is one optimizer update over
`cfg.accumulate` micro-batches. Read `train_one_step` for what a step does (batch -> views -> loss -> backward
-> clip -> step) and `train` for what happens around it (checkpoint, log, probe). Where the run is (step, data
position, random streams, timers, log window) lives in one object, state.TrainState.
"""
from __future__ import annotations

import math
import random
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from medssl.config import TrainConfig
from medssl.errors import TrainingError
from medssl.train import checkpoint as ckpt
from medssl.train.batches import add_scalars, move_to_device
from medssl.train.distributed import all_mean, barrier, current, wrap_model
from medssl.train.schedule import build_optimizer, warmup_cosine
from medssl.train.state import TrainState, follow_current_schedule, resume, save_checkpoint
from medssl.ui import TrainProgress, console


def train(method: nn.Module, loader_factory: Callable, cfg: TrainConfig, out_dir: Path, tracker,
          device: torch.device | str, on_step: Callable[[int, dict], None] | None = None, probe=None,
          keep_checkpoints: int = 2, config: dict | None = None, sync_batchnorm: bool = False,
          prepare: Callable[[dict], dict] | None = None) -> dict:
    """Train `method` for cfg.steps optimizer steps, resuming from the newest checkpoint in out_dir/checkpoints.

    on_step(step, metrics) runs on every rank after every step (metrics: loss, lr, grad_norm); `probe(encoder,
    device) -> dict` runs on rank 0 every cfg.probe_every steps; `config` is stored in each checkpoint;
    sync_batchnorm: BatchNorm statistics over all GPUs under DDP (CUDA only; PyTorch has no CPU kernel);
    prepare(batch) runs on each micro-batch once it is on the device (e.g. DeviceCrops.fill: positions -> crops).
    Under cfg.budget_minutes the run stops on time (see state.TrainState.should_stop).
    Returns {"step", "loss", "checkpoint", "resumed_from", "elapsed_s", "planned_steps" (None without a budget)}.
    """
    device, info = torch.device(device), current()
    seed_everything(cfg.seed + 1000 * info.rank)  # each rank its own random views
    channels_last = _place(method, device, sync_batchnorm and info.enabled)
    optimizer = build_optimizer(method, cfg, device)
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, cfg.steps)
    if info.rank == 0:
        ckpt.remove_partial_saves(out_dir)
    barrier()  # every rank sees the same newest checkpoint (rank 0 may just have written one)
    settings = {"train": cfg.model_dump(mode="json"), "world_size": info.world_size, **(config or {})}
    state, resumed = resume(loader_factory, cfg, Path(out_dir), method, optimizer, scheduler, settings, info)
    model = wrap_model(method, device)  # DDP under torchrun (rank 0's weights broadcast), else `method` itself
    model = torch.compile(model) if cfg.compile else model
    method.train()
    main, loss = info.rank == 0, None
    # the method's own work after each update (DINO: the EMA teacher); methods outside medssl.ssl may lack it
    after_step = getattr(method, "after_step", None) or (lambda: None)
    with TrainProgress(state.total_steps, state.step, enabled=main) as bar:
        while not state.should_stop():
            with _out_of_memory_as_error(cfg, device, state.step + 1):
                metrics = train_one_step(model, optimizer, scheduler, state, cfg, device, prepare, channels_last)
            after_step()
            if state.take_new_plan():  # a time budget's steps are known: warm-up + cosine over them from now on
                follow_current_schedule(scheduler, optimizer, cfg, state.total_steps)
            loss = metrics["loss"]
            bar.advance(state.samples_per_s(info.world_size), loss, state.total_steps)
            if on_step is not None:
                on_step(state.step, metrics)
            if state.due(cfg.checkpoint_every):  # collective: every rank takes part
                save_checkpoint(state, method, optimizer, scheduler, settings, keep_checkpoints, info, cfg.seed)
            if main and state.due(cfg.log_every):
                tracker.log_metrics(_log_line(state, metrics, device, info.world_size), step=state.step)
            if main and probe is not None and state.due(cfg.probe_every, at_end=False):
                _run_probe(probe, method.encoder, device, tracker, state.step)
    barrier()  # the final checkpoint exists before any rank returns
    last = ckpt.latest_checkpoint(state.out_dir)
    return {"step": state.step, "loss": loss, "checkpoint": str(last) if last else None, "resumed_from": resumed,
            "elapsed_s": state.elapsed_s(), "planned_steps": state.planned_steps}


def train_one_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, state: TrainState,
                   cfg: TrainConfig, device: torch.device, prepare: Callable[[dict], dict] | None = None,
                   channels_last: bool = False) -> dict:
    """One optimizer update over cfg.accumulate micro-batches: batch -> views -> loss -> backward, then clip ->
    check -> step. Raises before the update if the loss or the gradient is not finite, so neither the weights
    nor the last checkpoint ever hold a NaN. Returns {"loss", "lr", "grad_norm" (floats), "extras" (the
    method's diagnostics, 0-d tensors)}."""
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, torch.Tensor] = {}  # scalar outputs summed over the micro-batches, kept on the device
    for micro in range(cfg.accumulate):
        batch = state.next_batch()  # {"image": (B, C, *crop), ...} or, with device crops, crop positions
        batch = move_to_device(batch, device, channels_last)
        if prepare is not None:
            batch = prepare(batch)  # device crops: {"image_at": (B, 2 + nd)} -> {"image": (B, C, *crop)}
        # DDP all-reduces the gradients once, on the last micro-batch
        with nullcontext() if micro == cfg.accumulate - 1 else _no_sync(model):
            with autocast_for(cfg, device):
                out = model(batch)  # the method makes its random views here: {"loss": (), ...diagnostics}
            (out["loss"] / cfg.accumulate).backward()
        add_scalars(sums, out)
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)  # (), before clipping
    # one host sync per step: the loss (mean over micro-batches, then over ranks) and the gradient norm
    loss, norm = torch.stack([sums["loss"] / cfg.accumulate, grad_norm.float()]).tolist()
    loss = all_mean(loss, device)
    if not (math.isfinite(loss) and math.isfinite(norm)):
        raise _non_finite(state, loss, norm)
    lr = optimizer.param_groups[0]["lr"]  # the lr this update uses
    optimizer.step()
    scheduler.step()
    state.end_step(loss)
    extras = {k: v / cfg.accumulate for k, v in sums.items() if k != "loss"}  # still on the device
    return {"loss": loss, "lr": lr, "grad_norm": norm, "extras": extras}


# ----------------------------------------------------------------------------------- set-up pieces
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_for(cfg: TrainConfig, device: torch.device):
    """bf16 autocast on CUDA ("auto") or when asked ("bf16"); fp32 otherwise. bf16 needs no loss scaler."""
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"
                                       and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _place(method: nn.Module, device: torch.device, sync_batchnorm: bool) -> bool:
    """Move the method to the device (channels-last for 2D convolutions on CUDA); True if channels-last."""
    if sync_batchnorm and device.type == "cuda":
        nn.SyncBatchNorm.convert_sync_batchnorm(method)  # in place below the root; same Parameter objects
    channels_last = device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in method.modules())
    method.to(device, memory_format=torch.channels_last) if channels_last else method.to(device)
    return channels_last


def _no_sync(model: nn.Module):
    """DDP's no_sync (skip the gradient all-reduce of this backward); nothing to skip in one process."""
    return model.no_sync() if hasattr(model, "no_sync") else nullcontext()


# ----------------------------------------------------------------------------- what the loop reports
def _log_line(state: TrainState, metrics: dict, device: torch.device, world_size: int) -> dict:
    out = {**state.window_metrics(world_size), "train/lr": metrics["lr"], "train/grad_norm": metrics["grad_norm"]}
    out.update({f"train/{k}": float(v) for k, v in metrics["extras"].items()})
    if device.type == "cuda":
        out["train/gpu_max_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def _run_probe(probe, encoder: nn.Module, device: torch.device, tracker, step: int) -> None:
    # the probe runs after the checkpoint of this step: it must leave the random streams as it found them
    rng = ckpt.capture_rng()
    try:
        scores = probe(encoder, device)
    except (RuntimeError, ValueError) as err:  # a broken probe must not stop (or lose) the training run
        console.print(f"[yellow]probe failed at step {step}, training goes on:[/] {err}")
        return
    finally:
        ckpt.restore_rng(rng)
    tracker.log_metrics({f"probe/{k}": v for k, v in scores.items()}, step=step)
    console.print(f"step {step}: probe " + ", ".join(f"{k}={v:.3f}" for k, v in scores.items()))


def _non_finite(state: TrainState, loss: float, norm: float) -> TrainingError:
    last = ckpt.latest_checkpoint(state.out_dir)
    kept = f"the last good checkpoint is kept: {last}" if last else "no checkpoint had been written yet"
    what = "loss" if not math.isfinite(loss) else "gradient norm"
    return TrainingError(
        f"training stopped: {what} became non-finite (loss={loss}, grad norm={norm}) at step {state.step + 1}; "
        f"the weights were not updated with it, and {kept}",
        where=str(state.out_dir),
        fix="lower pretrain.train.lr (e.g. by 2-10x), enable or lower pretrain.train.grad_clip, "
            "raise train.warmup_steps, or use train.precision=fp32; rerunning resumes from the checkpoint")


@contextmanager
def _out_of_memory_as_error(cfg: TrainConfig, device: torch.device, step: int):
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise TrainingError(
            f"GPU out of memory at step {step} with train.batch_size={cfg.batch_size}",
            where=f"pretrain.train.batch_size / pretrain.crop ({device})",
            fix="lower pretrain.train.batch_size (raise train.accumulate to keep the effective batch) or "
                "use a smaller pretrain.crop") from None
