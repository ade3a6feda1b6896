"""Learning-rate schedule: linear warm-up, then cosine decay to a floor.

A `LambdaLR` over a picklable callable object, so `scheduler.state_dict()` holds everything needed to resume
(the step counter and the schedule's own settings), and a restored scheduler gives the same lr as the
uninterrupted one. The step counted here is the optimizer step (after gradient accumulation).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosine:
    """lr factor at optimizer step `step` (0-based): (step+1)/warmup during warm-up, then a half cosine from
    1 down to `min_ratio` at `total_steps`. A callable object (not a closure) so LambdaLR can save its state."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
        self.warmup_steps = max(0, int(warmup_steps))
        self.total_steps = max(1, int(total_steps))
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            # (step + 1) so the very first update already moves the weights
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * cosine


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_ratio: float = 0.0) -> LambdaLR:
    """The scheduler the training loop uses; call `.step()` once per optimizer step."""
    return LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, min_ratio))


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases and norm scales (1-D tensors); fused kernels on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type == "cuda")
