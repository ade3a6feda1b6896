"""What every SSL method shares: the hook the training loop calls after each optimizer update, and the
random stream its views and masks draw from."""
from __future__ import annotations

import torch
from torch import nn

from medssl.augment.stream import ViewStream


class SSLMethod(nn.Module):
    """An nn.Module with `.encoder`, `forward(batch) -> {"loss": ...}` and `after_step()`.

    The loop calls `after_step()` after every optimizer update, for every method, so methods with state
    outside the optimizer (DINO's EMA teacher) update it there and the loop never asks which method it runs.
    Views and masks draw from `self.stream` (`views_generator`), never from the global RNG: build_method
    seeds it from the run seed, and it is in the state dict, so checkpoints carry it.
    """

    def __init__(self):
        super().__init__()
        self.stream = ViewStream(0)

    def seed_views(self, seed: int) -> "SSLMethod":
        self.stream.seed = int(seed)
        return self

    def views_generator(self, batch: dict) -> torch.Generator:
        """The generator for this forward pass's views and masks, on the batch's device."""
        return self.stream.next(batch["image"].device)

    def after_step(self) -> None:
        """Nothing to do for methods whose every weight the optimizer updates."""


def encode_pair(encoder: nn.Module, v1, v2):
    """One encoder call on both views (B, C, *crop) each -> pooled features (2B, F): half the kernel launches,
    and BatchNorm sees the whole 2B batch."""
    x = torch.cat([v1, v2])  # (2B, C, *crop)
    if x.ndim == 4 and x.is_cuda:  # NHWC input makes cuDNN pick its faster tensor-core 2D kernels
        x = x.contiguous(memory_format=torch.channels_last)
    return encoder(x)
