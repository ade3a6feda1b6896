"""DINO-style self-distillation (Caron et al. 2021) for CNN and ViT encoders: a student matches a teacher that
is the exponential moving average (EMA) of itself; centring and sharpening of the teacher's output keep it
from collapsing to one prototype (centring alone: uniform; sharpening alone: one-hot).

Two views per crop, each view's student output matched to the other view's teacher output. The EMA update runs
in `after_step()`, which the training loop calls after every optimizer update for every method.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from medssl.config import DINOConfig, ViewsConfig
from medssl.ssl.base import SSLMethod, encode_pair
from medssl.ssl.contrastive import positive_views
from medssl.ssl.losses import dino_cross_entropy


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> cosine similarity to `out_dim` unit-norm prototypes (DINO's
    weight-normalised last layer with its gain fixed at 1)."""

    def __init__(self, in_features: int, cfg: DINOConfig):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_features, cfg.hidden_dim), nn.GELU(),
                                 nn.Linear(cfg.hidden_dim, cfg.hidden_dim), nn.GELU(),
                                 nn.Linear(cfg.hidden_dim, cfg.bottleneck_dim))
        self.prototypes = nn.Parameter(torch.randn(cfg.out_dim, cfg.bottleneck_dim) * 0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(features), dim=-1)  # (N, bottleneck)
        return z @ F.normalize(self.prototypes, dim=-1).T  # (N, out_dim), cosines in [-1, 1]


class DINO(SSLMethod):
    def __init__(self, encoder: nn.Module, cfg: DINOConfig, views: ViewsConfig):
        super().__init__()
        self.encoder, self.cfg, self.views = encoder, cfg, views
        self.head = DINOHead(encoder.out_features, cfg)
        # the teacher starts as the student; the optimizer never sees it (requires_grad False)
        self.teacher = nn.ModuleDict({"encoder": copy.deepcopy(encoder), "head": copy.deepcopy(self.head)})
        self.teacher.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))

    def forward(self, batch: dict) -> dict:
        v1, v2 = positive_views(batch, "views", self.views, self.views_generator(batch))
        student = self.head(encode_pair(self.encoder, v1, v2)).chunk(2)  # 2 x (B, out_dim)
        with torch.no_grad():
            teacher_logits = self.teacher["head"](encode_pair(self.teacher["encoder"], v1, v2))  # (2B, out_dim)
        teacher = teacher_logits.chunk(2)
        cfg = self.cfg
        loss = dino_cross_entropy(list(student), list(teacher), self.center, cfg.student_temperature,
                                  cfg.teacher_temperature)
        # the loss = the targets' entropy (set by centring/sharpening, not by the student) + KL(target || student):
        # the KL is what the student's updates lower; the entropy shows a collapse (0: one-hot, log K: uniform)
        entropy = self.teacher_entropy(teacher_logits)
        self.update_center(teacher_logits)
        return {"loss": loss, "loss_dino": loss.detach(), "teacher_entropy": entropy,
                "loss_kl": loss.detach() - entropy}

    @torch.no_grad()
    def teacher_entropy(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        p = F.softmax((teacher_logits.float() - self.center) / self.cfg.teacher_temperature, dim=-1)
        return -(p * p.clamp(min=1e-12).log()).sum(dim=-1).mean()

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA of the teacher's mean output (over all ranks' batches under torch.distributed)."""
        mean = teacher_logits.float().mean(dim=0, keepdim=True)  # (1, out_dim)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
        self.center.mul_(self.cfg.center_momentum).add_(mean, alpha=1 - self.cfg.center_momentum)

    @torch.no_grad()
    def after_step(self) -> None:
        """teacher <- m * teacher + (1 - m) * student; buffers (BatchNorm statistics) copied."""
        m = self.cfg.teacher_momentum
        for name, student in (("encoder", self.encoder), ("head", self.head)):
            teacher = self.teacher[name]
            for t, s in zip(teacher.parameters(), student.parameters()):
                t.mul_(m).add_(s.detach(), alpha=1 - m)
            for t, s in zip(teacher.buffers(), student.buffers()):
                t.copy_(s)
