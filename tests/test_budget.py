"""train.budget_minutes: the schedule laid over the steps the measured pace allows, a stop on time with a
saved checkpoint, and a resume that continues within the same budget."""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from medssl.config import TrainConfig
from medssl.train import checkpoint as ckpt
from medssl.train.loop import train

STEP_S = 0.05  # each forward sleeps this long: the pace is known, whatever the machine's load


class Slow(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(4, 1)

    def forward(self, batch):
        time.sleep(STEP_S)
        return {"loss": (self.encoder(batch["x"]).squeeze(1) - batch["y"]).pow(2).mean()}


class Log:
    def log_metrics(self, metrics, step=None):
        pass


def batches(epoch: int, position: int):
    g = torch.Generator().manual_seed(epoch)
    data = [{"x": torch.randn(4, 4, generator=g), "y": torch.randn(4, generator=g)} for _ in range(20)]
    return data[position:]


def _cfg(minutes: float) -> TrainConfig:
    return TrainConfig(steps=3, budget_minutes=minutes, warmup_steps=4, lr=0.01, checkpoint_every=5, log_every=5)


def test_stops_on_time_with_the_schedule_over_the_planned_steps(tmp_path):
    lrs, ends = [], []
    cfg = _cfg(0.03)  # 1.8 s: about 36 steps at 0.05 s (fewer where the machine is loaded)

    def record(step, metrics):
        lrs.append(metrics["lr"])
        ends.append(time.perf_counter())
    result = train(Slow(), batches, cfg, tmp_path, Log(), "cpu", on_step=record)
    wall = time.perf_counter() - (ends[0] - STEP_S)  # from the start of the first step (set-up is not training)
    planned, steps = result["planned_steps"], result["step"]
    assert steps > cfg.steps  # the budget, not `steps`, decides
    assert planned <= 1.8 / STEP_S + 1 and steps <= planned
    # the plan follows the pace the run really had (a loaded machine plans fewer, slower steps), not a constant
    pace = (ends[-1] - ends[0]) / max(1, len(ends) - 1)
    assert 0.4 * 1.8 / pace <= planned <= 2.5 * 1.8 / pace, (planned, pace)
    assert result["elapsed_s"] >= 1.8 or steps == planned  # stopped by the clock or at the planned end
    assert wall < 1.8 + 1.5  # on time: at most a step, the checkpoint and the set-up late
    assert ckpt.latest_checkpoint(tmp_path).name == ckpt.checkpoint_path(tmp_path, steps).name
    # warm-up (4 steps, at most a fifth of the plan) then a cosine that ends at the planned step
    assert lrs[:4] == pytest.approx([0.01 * (i + 1) / 4 for i in range(4)])
    if steps == planned:
        assert lrs[-1] < 0.01 * 0.05
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_resume_continues_within_the_same_budget(tmp_path):
    cfg = _cfg(0.03)

    def crash(step, metrics):
        if step == 12:  # after the checkpoint of step 10: steps 11-12 are lost and redone
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(Slow(), batches, cfg, tmp_path, Log(), "cpu", on_step=crash)
    saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    spent, planned = saved["data"]["elapsed_s"], saved["data"]["planned_steps"]
    assert saved["step"] == 10 and 10 * STEP_S <= spent < 1.8 and planned is not None
    ends = []
    result = train(Slow(), batches, cfg, tmp_path, Log(), "cpu", on_step=lambda s, m: ends.append(time.perf_counter()))
    wall = time.perf_counter() - (ends[0] - STEP_S)
    assert result["resumed_from"] and result["planned_steps"] == planned  # the same plan, not a new one
    assert result["step"] <= planned and (result["elapsed_s"] >= 1.8 or result["step"] == planned)
    assert wall < 1.8 - spent + 1.5  # only what was left of the budget
