"""Where a training run is: the step, the data position, the random streams, the timers and the log window.

`TrainState` is the one object the loop keeps besides the model, optimizer and scheduler. The loop asks it for
the next micro-batch, tells it a step ended, and asks it when to stop, checkpoint and log. A checkpoint stores
its position (`save_checkpoint`, together with every rank's random streams), and a restarted run rebuilds it at
exactly that point (`resume`): the same step, the same next batch, the same random views.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from medssl.errors import TrainingError
from medssl.train import checkpoint as ckpt
from medssl.train.batches import batch_samples
from medssl.train.distributed import DistInfo, gather_objects
from medssl.train.schedule import WarmupCosine
from medssl.ui import console

# train settings a resumed run may change (longer, another lr or schedule, other logging or speed settings);
# every other stored setting (data order, model, method, views, crop, ...) must match the checkpoint's
MEASURED_STEPS = 3  # steps timed (after the first) to plan a time budget's steps

RESUMABLE = {"steps", "lr", "warmup_steps", "grad_clip", "checkpoint_every", "keep_checkpoints", "log_every",
             "probe_every", "workers", "compile", "device_crops", "precision"}


class TrainState:
    """The run's folder, step, data position (epoch, micro-batches consumed in it) and the sums since the last
    log line.

    `loader_factory(epoch, position)` gives the batches of `epoch` from batch `position` on (see
    distributed.sharded_loader): a resumed run asks for the saved point and reads no skipped sample.
    """

    def __init__(self, out_dir: Path, loader_factory: Callable, steps: int, step: int = 0, epoch: int = 0,
                 position: int = 0, budget_s: float | None = None, elapsed_s: float = 0.0,
                 planned_steps: int | None = None):
        self.out_dir, self.loader_factory, self.steps = Path(out_dir), loader_factory, steps
        self.step, self.epoch, self.position = step, epoch, position
        # a time budget: seconds allowed, seconds spent before this process (restored from the checkpoint),
        # and the steps the measured throughput allows (None until measured)
        self.budget_s, self._elapsed_before, self.planned_steps = budget_s, elapsed_s, planned_steps
        self._started = time.perf_counter()
        self._timed: list[float] = []  # end times of this process's first steps: the throughput measurement
        self._new_plan = False
        self._batches = None  # iterator over the current epoch, from `position`
        self.start_window()

    # ------------------------------------------------------------------------------ when to stop and act
    def should_stop(self) -> bool:
        """The run has done its steps, or spent its time budget / done the steps planned for it (the one place
        a stop rule lives: the loop asks nothing else)."""
        if self.budget_s is None:
            return self.step >= self.steps
        return self.elapsed_s() >= self.budget_s or self.planned_steps is not None and self.step >= self.planned_steps

    def elapsed_s(self) -> float:
        """Training seconds spent, over every process that worked on this run."""
        return self._elapsed_before + time.perf_counter() - self._started

    @property
    def total_steps(self) -> int:
        """The steps the schedule spans: `steps`, or under a budget the planned steps once measured."""
        return self.planned_steps or self.steps if self.budget_s is not None else self.steps

    def take_new_plan(self) -> bool:
        """True once, right after the budget's steps were planned: the loop then lays the schedule over them."""
        new, self._new_plan = self._new_plan, False
        return new

    def _plan(self) -> None:
        """After MEASURED_STEPS timed steps (the first one, with its one-off start-up costs, left out): the
        steps the rest of the budget allows at the measured pace."""
        self._timed.append(time.perf_counter())
        if self.budget_s is None or self.planned_steps is not None or len(self._timed) < MEASURED_STEPS + 1:
            return
        per_step = (self._timed[-1] - self._timed[0]) / MEASURED_STEPS
        left = max(0.0, self.budget_s - self.elapsed_s())
        self.planned_steps, self._new_plan = self.step + max(1, int(left / max(per_step, 1e-9))), True

    def due(self, every: int | None, at_end: bool = True) -> bool:
        """After every `every`-th step (and, with at_end, after the last one: the final checkpoint and log)."""
        return bool(every) and self.step % every == 0 or at_end and self.should_stop()

    # ------------------------------------------------------------------------------------------- the data
    def next_batch(self):
        """The next micro-batch, one epoch after another; counts the position, the samples and the wait."""
        start = time.perf_counter()
        while True:
            if self._batches is None:
                self._batches = _quiet_iter(self.loader_factory(self.epoch, self.position))
            try:
                batch = next(self._batches)
                break
            except StopIteration:
                if self.position == 0:
                    raise TrainingError(f"the data loader gave no batch for epoch {self.epoch}",
                                        where="pretrain training images",
                                        fix="add images or lower train.batch_size") from None
                self.epoch, self.position, self._batches = self.epoch + 1, 0, None
        self.position += 1
        self._wait += time.perf_counter() - start
        self._samples += batch_samples(batch)
        return batch

    # ------------------------------------------------------------------------------------ the log window
    def end_step(self, loss: float) -> None:
        self.step += 1
        self._steps, self._loss = self._steps + 1, self._loss + loss
        self._plan()

    def start_window(self) -> None:
        self._steps, self._loss, self._samples, self._wait = 0, 0.0, 0, 0.0
        self._since = time.perf_counter()

    def samples_per_s(self, world_size: int) -> float:
        """Samples per second of all ranks since the last log line."""
        return self._samples * world_size / max(time.perf_counter() - self._since, 1e-9)

    def window_metrics(self, world_size: int) -> dict:
        """Mean loss, throughput and data-wait share since the last log line; starts the next window."""
        elapsed = max(time.perf_counter() - self._since, 1e-9)
        out = {"train/loss": self._loss / max(self._steps, 1), "train/samples_per_s": self.samples_per_s(world_size),
               "train/data_wait": self._wait / elapsed}
        self.start_window()
        return out


def _quiet_iter(loader):
    """iter(loader) without touching the global torch RNG: a DataLoader with no generator draws its worker
    seed from it, and a resumed run creates its iterator at another point of the random stream than the
    uninterrupted run did; the views made from that stream must not differ."""
    state = torch.get_rng_state()
    try:
        return iter(loader)
    finally:
        torch.set_rng_state(state)


# ----------------------------------------------------------------------------------- across restarts
def save_checkpoint(state: TrainState, method, optimizer, scheduler, config: dict, keep: int, info: DistInfo,
                    seed: int) -> None:
    """The weights, optimizer, schedule, position and every rank's random streams (so each rank resumes its own
    random views). Collective under DDP: all ranks call it; rank 0 writes."""
    rng_ranks = gather_objects(ckpt.capture_rng()) if info.enabled else None
    if info.rank != 0:
        return
    data = {"seed": seed, "epoch": state.epoch, "position": state.position}
    if state.budget_s is not None:  # what a resume needs to continue within the same budget
        data.update(elapsed_s=state.elapsed_s(), planned_steps=state.planned_steps)
    ckpt.save_checkpoint(ckpt.checkpoint_path(state.out_dir, state.step), model=method, optimizer=optimizer,
                         scheduler=scheduler, scaler=None, step=state.step, data=data, config=config,
                         rng_ranks=rng_ranks)
    ckpt.prune_checkpoints(state.out_dir, keep)


def resume(loader_factory: Callable, cfg, out_dir: Path, method, optimizer, scheduler, settings: dict,
           info: DistInfo) -> tuple[TrainState, str | None]:
    """(state, checkpoint path) of the newest readable checkpoint, restored into the objects and the random
    streams; a fresh state (and None) without one. An unreadable newest file is skipped for the one before it
    (nothing good is lost because of it)."""
    for path in reversed(ckpt.list_checkpoints(out_dir)):
        try:
            saved = ckpt.load_checkpoint(path)
        except TrainingError as err:
            if info.rank == 0:
                console.print(f"[yellow]skipping a checkpoint that cannot be read:[/] {err.what} ({path})")
            continue
        check_compatible(saved.get("config", {}), settings, path)
        ckpt.restore_training_state(saved, method, optimizer, scheduler, None, str(path))
        data = saved["data"]
        state = TrainState(out_dir, loader_factory, cfg.steps, saved["step"], data["epoch"], data["position"],
                           budget_s=budget_seconds(cfg), elapsed_s=data.get("elapsed_s", 0.0),
                           planned_steps=data.get("planned_steps"))
        follow_current_schedule(scheduler, optimizer, cfg, state.total_steps)
        ranks = saved.get("rng_ranks")
        ckpt.restore_rng(ranks[info.rank] if ranks and len(ranks) == info.world_size else saved["rng"])
        if info.rank == 0:
            console.print(f"resuming from step {saved['step']} ({path})")
        return state, str(path)
    return TrainState(out_dir, loader_factory, cfg.steps, budget_s=budget_seconds(cfg)), None


def budget_seconds(cfg) -> float | None:
    return None if cfg.budget_minutes is None else 60.0 * cfg.budget_minutes


def check_compatible(saved: dict, now: dict, path: Path) -> None:
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


def follow_current_schedule(scheduler, optimizer, cfg, total_steps: int | None = None) -> None:
    """A resumed run follows the current train.lr / warmup_steps / steps (e.g. a lower lr after a NaN stop),
    not the ones saved in the scheduler; with unchanged settings this is a no-op. `total_steps`: the steps a
    time budget allows (its warm-up then at most a fifth of them), laid over the budget once measured."""
    total = cfg.steps if total_steps is None else total_steps
    warmup = cfg.warmup_steps if total_steps is None or cfg.budget_minutes is None else min(cfg.warmup_steps,
                                                                                            total // 5)
    scheduler.lr_lambdas = [WarmupCosine(warmup, total) for _ in optimizer.param_groups]
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)
