"""The recipes bench_label_efficiency.py compares, and the time-budgeted pretraining of each.

Every trained recipe runs through medssl's own loop (medssl.train.loop.train) under the same
`train.budget_minutes`, on the same unlabelled internal images (both tasks' training pools, random 32^3 crops).
The MONAI tutorial's recipe (ViTAutoEnc, L1 reconstruction + contrastive, its coarse dropout / shuffle views,
here scaled from 96^3 to 32^3 crops and made ViT-S-sized for a CPU) is written here as a small module in the
same loop, so the budget and the data are the same.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medssl.config import (ContrastiveConfig, DINOConfig, EncoderConfig, PretrainConfig, SparKConfig, SSLConfig,
                           TrainConfig, VICRegConfig, ViewsConfig)

CPU_ENCODER = EncoderConfig(name="resnet10", width=0.25)  # configs/encoders/resnet10_cpu.yaml
MR_VIEWS = ViewsConfig(flip_prob=0.5, rotate_degrees=15, scale_range=(0.85, 1.15), crop_jitter=0.2,
                       intensity_scale=0.2, intensity_shift=0.1, gamma_range=(0.7, 1.4), noise_std=0.05,
                       blur_sigma=(0.0, 1.0))  # configs/views/mr.yaml
SITE_VIEWS = MR_VIEWS.model_copy(update={"gamma_range": (0.5, 2.0), "bias_field": 0.3,
                                         "resolution_range": (1.0, 2.5)})  # configs/views/mr_sites.yaml
SSL = {"simclr": SSLConfig(contrastive=ContrastiveConfig(temperature=0.1)),
       "vicreg": SSLConfig(vicreg=VICRegConfig()),
       "dino": SSLConfig(dino=DINOConfig()),
       "spark": SSLConfig(spark=SparKConfig())}  # configs/ssl/spark.yaml: 60% of the 64 8^3 patches masked
# name -> (SSL objective, views); "tutorial" is the MONAI tutorial anchor, "random" an untrained encoder
RECIPES = {
    "simclr": ("simclr", MR_VIEWS),          # medssl's CPU default before this benchmark
    "simclr+site": ("simclr", SITE_VIEWS),
    "vicreg": ("vicreg", MR_VIEWS),
    "vicreg+site": ("vicreg", SITE_VIEWS),
    "dino+site": ("dino", SITE_VIEWS),
    "spark": ("spark", MR_VIEWS),            # masked modelling for the CNN (SparK), the same ResNet-10
}
CROP = [32, 32, 32]
# 2D recipes: pretrained on 32^2 crops of random axial slices of the same volumes, then every image is scored
# from all its axial slices (models/slices.py SlicePooled, the ladder's finetune.slice_pooling: meanmax)
SLICE_RECIPES = {"simclr-2d-slices": ("simclr", MR_VIEWS)}


class CropStream:
    """loader_factory(epoch, position) for the loop: endless batches of random 32^3 crops of the volumes,
    crop i of batch j drawn from its own seeded stream (a resumed run reads the same crops)."""

    def __init__(self, volumes: list[np.ndarray], batch_size: int, seed: int = 0, dims: int = 3):
        self.volumes, self.batch_size, self.seed, self.dims = volumes, batch_size, seed, dims

    def __call__(self, epoch: int, position: int):
        j = position
        while True:
            rng = np.random.default_rng([self.seed, epoch, j])
            crops = [self._crop(self.volumes[rng.integers(len(self.volumes))], rng) for _ in range(self.batch_size)]
            yield {"image": torch.from_numpy(np.stack(crops))}  # (B, 1, 32, 32, 32) or 2D: (B, 1, 32, 32)
            j += 1

    def _crop(self, volume: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        starts = [int(rng.integers(0, n - c + 1)) for n, c in zip(volume.shape[1:], CROP)]
        crop = volume[(slice(None),) + tuple(slice(s, s + c) for s, c in zip(starts, CROP))]
        return crop if self.dims == 3 else crop[..., int(rng.integers(crop.shape[-1]))]  # one axial slice


class _Quiet:
    def log_metrics(self, *args, **kwargs):
        pass


def pretrain(method: nn.Module, volumes, minutes: float, lr: float, seed: int = 0, batch_size: int = 16,
             weight_decay: float = 0.05, dims: int = 3) -> dict:
    """Train `method` for `minutes` in medssl's loop; {"steps", "elapsed_s"}."""
    from medssl.train.loop import train
    cfg = TrainConfig(budget_minutes=minutes, batch_size=batch_size, lr=lr, warmup_steps=20, seed=seed,
                      weight_decay=weight_decay, checkpoint_every=10 ** 6, log_every=10 ** 6, grad_clip=1.0)
    with tempfile.TemporaryDirectory() as out:
        result = train(method, CropStream(volumes, batch_size, seed, dims), cfg, Path(out), _Quiet(), "cpu")
    method.eval()
    return {"steps": result["step"], "elapsed_s": round(result["elapsed_s"], 1)}


def medssl_recipe(name: str, volumes, minutes: float, seed: int = 0) -> tuple[nn.Module, dict]:
    from medssl.ssl import build_method
    from medssl.train.loop import seed_everything
    objective, views = RECIPES[name]
    cfg = PretrainConfig(encoder=CPU_ENCODER, ssl=SSL[objective], views=views, crop=CROP)
    seed_everything(seed)
    method = build_method(cfg, 3)
    return method.encoder, pretrain(method, volumes, minutes, lr=1e-3, seed=seed)


def slice_recipe(name: str, volumes, minutes: float, seed: int = 0) -> tuple[nn.Module, dict]:
    """A 2D encoder pretrained on axial slices, returned slice-pooled: it scores (B, 1, 32, 32, 32) volumes."""
    from medssl.models.slices import SlicePooled
    from medssl.ssl import build_method
    from medssl.train.loop import seed_everything
    objective, views = SLICE_RECIPES[name]
    cfg = PretrainConfig(encoder=CPU_ENCODER, ssl=SSL[objective], views=views, crop=CROP[:2])
    seed_everything(seed)
    method = build_method(cfg, 2)
    info = pretrain(method, volumes, minutes, lr=1e-3, seed=seed, dims=2)
    return SlicePooled(method.encoder, "meanmax").eval(), info


def random_encoder(seed: int = 0) -> nn.Module:
    from medssl.models.encoders import build_encoder
    torch.manual_seed(seed)
    return build_encoder(CPU_ENCODER, 3, CROP).eval()


class TutorialEncoder(nn.Module):
    """ViTAutoEnc's encoder half: patch embedding, transformer blocks, norm, mean over tokens -> (B, hidden)."""

    def __init__(self, net: nn.Module, hidden: int):
        super().__init__()
        self.net, self.out_features = net, hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.net.patch_embedding(x)  # (B, L, hidden)
        for block in self.net.blocks:
            tokens = block(tokens)
        return self.net.norm(tokens).mean(dim=1)


class TutorialRecipe(nn.Module):
    """The MONAI tutorial's objective: both views through ViTAutoEnc, L1(view-1 reconstruction, the crop) +
    contrastive(view-1, view-2 reconstructions) * L1, its views made per sample on the CPU with MONAI's
    RandCoarseDropout / RandCoarseShuffle (sizes scaled by 32/96 from the tutorial's 96^3)."""

    def __init__(self, hidden: int = 384, layers: int = 6, heads: int = 6, seed: int = 0):
        super().__init__()
        from monai.losses import ContrastiveLoss
        from monai.networks.nets import ViTAutoEnc
        from monai.transforms import Compose, OneOf, RandCoarseDropout, RandCoarseShuffle
        self.net = ViTAutoEnc(in_channels=1, img_size=CROP, patch_size=16, hidden_size=hidden, mlp_dim=4 * hidden,
                              num_layers=layers, num_heads=heads, spatial_dims=3)
        self.encoder = TutorialEncoder(self.net, hidden)
        self.views = Compose([
            OneOf([RandCoarseDropout(holes=6, spatial_size=2, dropout_holes=True, max_spatial_size=11, prob=1.0),
                   RandCoarseDropout(holes=6, spatial_size=7, dropout_holes=False, max_spatial_size=21, prob=1.0)]),
            RandCoarseShuffle(holes=10, spatial_size=3, prob=0.8)])
        self.views.set_random_state(seed)
        self.l1, self.contrastive = nn.L1Loss(), ContrastiveLoss(temperature=0.05)

    def after_step(self) -> None:
        pass

    def _view(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.as_tensor(self.views(sample)) for sample in x])

    def forward(self, batch: dict) -> dict:
        x = batch["image"]  # (B, 1, 32, 32, 32)
        out1, _ = self.net(self._view(x))
        out2, _ = self.net(self._view(x))
        r = self.l1(out1, x)
        c = self.contrastive(out1.flatten(1), out2.flatten(1))
        return {"loss": r + c * r, "loss_l1": r.detach(), "loss_contrastive": c.detach()}


def tutorial_recipe(volumes, minutes: float, seed: int = 0) -> tuple[nn.Module, dict]:
    torch.manual_seed(seed)
    method = TutorialRecipe(seed=seed)
    # the tutorial's Adam at lr 1e-4, batch as the others (AdamW without weight decay is Adam)
    return method.encoder, pretrain(method, volumes, minutes, lr=1e-4, seed=seed, weight_decay=0.0)


def engineered_features(images: np.ndarray) -> np.ndarray:
    """(N, 1, *spatial) -> (N, 88): intensities pooled to 4^3, a 16-bin histogram, intensity percentiles,
    mean and spread, and gradient-magnitude statistics (texture). No learning; the non-deep arm."""
    x = torch.from_numpy(images).float()
    pooled = torch.nn.functional.adaptive_avg_pool3d(x, 4).flatten(1)  # (N, 64)
    flat = x.flatten(1)
    hist = torch.stack([torch.histc(row, bins=16, min=0.0, max=1.2) for row in flat]) / flat.shape[1]
    stats = torch.stack([flat.mean(1), flat.std(1), *torch.quantile(flat, torch.tensor([0.1, 0.5, 0.9]), dim=1)], 1)
    grads = torch.gradient(x[:, 0], dim=(1, 2, 3))
    magnitude = torch.sqrt(sum(g ** 2 for g in grads)).flatten(1)
    texture = torch.stack([magnitude.mean(1), magnitude.std(1), torch.quantile(magnitude, 0.9, dim=1)], 1)
    return torch.cat([pooled, hist, stats, texture], 1).numpy()
