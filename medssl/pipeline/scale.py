"""One `scale` knob: the same pipeline file runs as a laptop demo (scale 1) or larger on GPUs (scale 10-100).

Scale multiplies what grows with compute: the demo cohort's size, pretraining steps and the ladder's epochs.
Model and crop sizes stay as written: those are choices about the science, not about the budget.
"""
from __future__ import annotations

from medssl.config import PipelineConfig


def apply_scale(cfg: PipelineConfig) -> PipelineConfig:
    if cfg.scale == 1:
        return cfg
    cfg = cfg.model_copy(deep=True)
    if cfg.data.demo is not None:
        cfg.data.demo.subjects = max(4, round(cfg.data.demo.subjects * cfg.scale))
    cfg.pretrain.train.steps = max(1, round(cfg.pretrain.train.steps * cfg.scale))
    cfg.pretrain.train.checkpoint_every = max(1, round(cfg.pretrain.train.checkpoint_every * cfg.scale))
    cfg.finetune.epochs = max(1, round(cfg.finetune.epochs * min(cfg.scale, 10)))
    return cfg
