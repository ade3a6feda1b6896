"""Train one segmentation network on a rung's labelled volumes, and segment whole volumes.

Training: a fixed number of optimizer steps (SegmentationConfig.steps, the same at every rung and for SSL and
scratch), each on `batch_size` patches cut by MONAI RandCropByPosNegLabel (foreground oversampling) from
volumes drawn at random, with Dice + cross-entropy (MONAI DiceCELoss) and AdamW (the encoder at
finetune.encoder_lr_scale of the decoder's rate), cosine decay. No validation labels are read: nothing is
chosen, so the budget is exactly the rung's own volumes. Inference: MONAI sliding_window_inference over the
whole cached volume with Gaussian blending, then argmax.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.transforms import RandCropByPosNegLabel, SpatialPad

from medssl.config import FinetuneConfig, SegmentationConfig
from medssl.errors import ConfigError, DataError


@dataclass
class SegResult:
    model: torch.nn.Module
    history: list[dict]          # {"step", "loss"} every few steps
    final_loss: float            # mean training loss of the last 10 % of steps (the rung's own volumes)


class PatchSampler:
    """Random patches (C, *patch) and their masks (1, *patch) from in-memory volumes; seeded, no global RNG."""

    def __init__(self, volumes: list[tuple[np.ndarray, np.ndarray]], patch: list[int], pos_fraction: float,
                 seed: int):
        self.patch, self.rng = list(patch), np.random.default_rng(seed)
        pad = SpatialPad(self.patch)                           # volumes smaller than a patch: zero-padded
        # np.array copies: cached arrays are read-only memory maps, and tensors want writable memory
        self.volumes = [(pad(torch.from_numpy(np.array(i, np.float32))), pad(torch.from_numpy(np.array(m))))
                        for i, m in volumes]
        pos = pos_fraction if pos_fraction < 1 else 1.0
        self.crop = RandCropByPosNegLabel(self.patch, pos=pos, neg=1.0 - pos, num_samples=1, allow_smaller=False)
        self.crop.set_random_state(state=np.random.RandomState(seed))

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, *patch) float32, (B, 1, *patch) long."""
        images, masks = [], []
        for k in self.rng.integers(0, len(self.volumes), size):
            image, mask = self.volumes[k]
            both = torch.cat([image, mask.to(image.dtype)])    # crop image and mask at one position
            (crop,) = self.crop(both, label=mask)
            images.append(crop[:-1])
            masks.append(crop[-1:].round().long())
        return torch.stack(images).float(), torch.stack(masks)


def check_foreground(masks: list[np.ndarray], where: str) -> None:
    if not any(bool((np.asarray(m) > 0).any()) for m in masks):
        raise DataError(f"the training volumes of {where} have no foreground voxel: nothing to learn to segment",
                        where=where, fix="check the masks (all empty?) or use a rung with more labelled volumes")


def train_segmenter(net: torch.nn.Module, volumes: list[tuple[np.ndarray, np.ndarray]], seg: SegmentationConfig,
                    ft: FinetuneConfig, patch: list[int], seed: int, device: str = "cpu",
                    where: str = "the training volumes") -> SegResult:
    check_foreground([m for _, m in volumes], where)
    if seg.batch_size < 2 and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        raise ConfigError("segmentation batch_size 1 with a BatchNorm encoder (ResNet): its deepest stage sees "
                          "one value per channel", where="finetune.segmentation.batch_size", fix="use 2 or more")
    torch.manual_seed(seed)
    net = net.to(device).train()
    sampler = PatchSampler(volumes, patch, seg.pos_fraction, seed)
    encoder = list(net.encoder.parameters())
    ids = {id(p) for p in encoder}
    groups = [{"params": [p for p in encoder if p.requires_grad], "lr": seg.lr * ft.encoder_lr_scale},
              {"params": [p for p in net.parameters() if id(p) not in ids and p.requires_grad], "lr": seg.lr}]
    optimizer = torch.optim.AdamW(groups, weight_decay=ft.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / seg.steps)))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    history, losses = [], []
    for step in range(seg.steps):
        images, masks = sampler.batch(seg.batch_size)
        loss = loss_fn(net(images.to(device)), masks.to(device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite segmentation loss at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == seg.steps - 1:
            history.append({"step": step, "loss": losses[-1]})
    tail = losses[-max(1, seg.steps // 10):]
    return SegResult(net.eval(), history, float(np.mean(tail)))


@torch.no_grad()
def segment(net: torch.nn.Module, image: np.ndarray, patch: list[int], overlap: float, device: str = "cpu"
            ) -> np.ndarray:
    """(C, *spatial) -> (*spatial) int labels, by sliding windows of `patch` over the whole volume."""
    x = torch.as_tensor(np.asarray(image, np.float32))[None].to(device)            # (1, C, *spatial)
    logits = sliding_window_inference(x, patch, sw_batch_size=4, predictor=net.eval(), overlap=overlap,
                                      mode="gaussian", padding_mode="constant")
    return logits[0].argmax(0).cpu().numpy().astype(np.int32)
