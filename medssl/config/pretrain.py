"""The encoder, the SSL method, its views and the training loop."""
from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from medssl.config.base import Section


class EncoderConfig(Section):
    name: Literal["resnet10", "resnet18", "resnet34", "resnet50", "vit"] = "resnet18"
    in_channels: int = Field(1, ge=1)
    width: float = Field(1.0, gt=0, le=4, description="ResNet only: channel-width multiplier")
    patch_size: int = Field(16, ge=2, description="ViT only")
    hidden_size: int = Field(768, ge=8, description="ViT only")
    num_layers: int = Field(12, ge=1, description="ViT only")
    num_heads: int = Field(12, ge=1, description="ViT only")
    mlp_dim: int = Field(3072, ge=8, description="ViT only")


class ViewsConfig(Section):
    """Random views made batched on the training device (medssl/views.py)."""
    flip_prob: float = Field(0.5, ge=0, le=1)
    rotate_degrees: float = Field(10.0, ge=0)
    scale_range: tuple[float, float] = (0.9, 1.1)
    crop_jitter: float = Field(0.1, ge=0, lt=1, description="random zoom-in share of the crop")
    intensity_scale: float = Field(0.1, ge=0)
    intensity_shift: float = Field(0.1, ge=0)
    gamma_range: tuple[float, float] = (0.8, 1.25)
    noise_std: float = Field(0.05, ge=0)
    blur_sigma: tuple[float, float] = (0.0, 1.0)
    cutout_fraction: float = Field(0.0, ge=0, lt=1)
    # site effects (medssl/augment/site_views.py); None = off, and a checkpoint written before they existed
    # still resumes (its stored settings lack them, which reads as None too)
    bias_field: float | None = Field(None, ge=0, description="site views: largest coefficient of a smooth "
                                     "log-polynomial multiplicative field (MONAI RandBiasField-like); 0.3 is strong")
    resolution_range: tuple[float, float] | None = Field(
        None, description="site views: down-sampling factor drawn per sample (e.g. [1, 3]); the view is "
                          "averaged down to 1/factor of its size and resampled back (a coarser scanner)")

    @model_validator(mode="after")
    def _resolution_at_least_one(self):
        if self.resolution_range is not None and not 1 <= self.resolution_range[0] <= self.resolution_range[1]:
            raise ValueError("resolution_range needs 1 <= low <= high (factors of down-sampling)")
        return self


class ContrastiveConfig(Section):
    weight: float = Field(1.0, gt=0)
    temperature: float = Field(0.1, gt=0)
    projection_dim: int = Field(128, ge=8)
    positives: Literal["views", "patient", "study"] = "views"


class MaskedConfig(Section):
    weight: float = Field(1.0, gt=0)
    mask_ratio: float = Field(0.75, gt=0, lt=1)
    norm_pix_loss: bool = True
    decoder_dim: int = Field(256, ge=8)
    decoder_depth: int = Field(2, ge=1)
    decoder_heads: int = Field(8, ge=1)


class VICRegConfig(Section):
    """VICReg (Bardes et al. 2022): invariance + variance + covariance terms; no negatives, so small batches
    are fine (CPU)."""
    invariance_weight: float = Field(25.0, ge=0)
    variance_weight: float = Field(25.0, ge=0)
    covariance_weight: float = Field(1.0, ge=0)
    expander_dim: int = Field(512, ge=8, description="width of the 3-layer expander (the paper: 8192)")


class DINOConfig(Section):
    """DINO-style self-distillation: a teacher (EMA of the student) with centring and sharpening."""
    out_dim: int = Field(1024, ge=8, description="prototypes (the paper: 65536)")
    bottleneck_dim: int = Field(128, ge=8)
    hidden_dim: int = Field(512, ge=8)
    student_temperature: float = Field(0.1, gt=0)
    teacher_temperature: float = Field(0.04, gt=0, description="sharpening: lower than the student's")
    center_momentum: float = Field(0.9, ge=0, lt=1)
    teacher_momentum: float = Field(0.99, ge=0, lt=1, description="EMA per step; 0.996 in the paper (long runs)")


class SparKConfig(Section):
    """SparK (Tian et al. 2023): masked modelling for CNN (ResNet) encoders. Random input patches are masked,
    the ResNet runs as a sparse CNN on the visible ones (medssl/models/sparse.py), a UNet-like decoder over its
    stages reconstructs the image, and the loss is the MSE on the masked patches."""
    mask_ratio: float = Field(0.6, gt=0, lt=1, description="share of input patches masked (the paper: 0.6)")
    patch_size: int = Field(8, ge=1, description="edge of a masked input patch, voxels; every crop edge must be a "
                                                 "multiple (the paper: 32, the ResNet's stride, on 224^2 images; "
                                                 "8 gives 64 patches on a 32^3 crop)")
    norm_pix_loss: bool = Field(True, description="targets standardised per patch (mean 0, variance 1), as in MAE")


class SSLConfig(Section):
    """Both contrastive and masked set = reconstruction + contrastive (the MONAI tutorial's recipe); vicreg,
    dino and spark stand alone."""
    contrastive: ContrastiveConfig | None = None
    masked: MaskedConfig | None = None
    vicreg: VICRegConfig | None = None
    dino: DINOConfig | None = None
    spark: SparKConfig | None = None

    @model_validator(mode="after")
    def _one_method(self):
        chosen = self.objectives()
        if not chosen:
            raise ValueError("choose an SSL objective: ssl.contrastive, ssl.masked (or both), ssl.vicreg, "
                             "ssl.dino or ssl.spark")
        if len(chosen) > 1 and set(chosen) != {"contrastive", "masked"}:
            raise ValueError(f"ssl.{' and ssl.'.join(chosen)} cannot be combined; only contrastive + masked can")
        return self

    def objectives(self) -> tuple[str, ...]:
        """The configured objectives, in field order (the key of medssl.ssl.METHODS)."""
        return tuple(name for name in ("contrastive", "masked", "vicreg", "dino", "spark") if getattr(self, name) is not None)


class TrainConfig(Section):
    steps: int = Field(200, ge=1, description="optimizer steps (ignored when budget_minutes is set)")
    budget_minutes: float | None = Field(
        None, gt=0, description="train for this much time instead of `steps`: the warm-up + cosine schedule is "
                                "laid over the steps the throughput of the first steps allows; the run stops on "
                                "time and saves, and a resumed run continues within the same budget")
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_steps: int = Field(20, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    accumulate: int = Field(1, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept on disk")
    log_every: int = Field(10, ge=1)
    probe_every: int | None = Field(None, ge=1, description="steps between online kNN/logistic probes")
    seed: int = 0
    workers: int = Field(0, ge=0)
    device_crops: Literal["auto", "on", "off"] = Field(
        "auto", description="keep the training images on the training device and cut crops there (auto: on a "
                            "GPU, when they take at most 40% of its free memory); same crops either way")
    compile: bool = False
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    deterministic: bool = Field(
        False, description="PyTorch's deterministic algorithms (bit-exact reruns on one device, some speed lost); "
                           "an op without a deterministic implementation stops the run with its name")


class PretrainConfig(Section):
    encoder: EncoderConfig = EncoderConfig()
    ssl: SSLConfig = SSLConfig(contrastive=ContrastiveConfig())
    views: ViewsConfig = ViewsConfig()
    train: TrainConfig = TrainConfig()
    crop: list[int] = Field([32, 32, 32], description="crop given to the model, voxels")

    @model_validator(mode="after")
    def _spark_fits_the_crop(self):
        spark = self.ssl.spark
        if spark is None:
            return self
        # the decoder climbs back up the ResNet's five stride-2 levels; the mask grid must tile the crop
        for multiple, what in ((32, "the ResNet's stride"), (spark.patch_size, "ssl.spark.patch_size")):
            if any(c % multiple for c in self.crop):
                raise ValueError(f"ssl.spark needs every crop edge a multiple of {multiple} ({what}); crop is "
                                 f"{self.crop}")
        patches = math.prod(c // spark.patch_size for c in self.crop)
        visible = max(1, round(patches * (1 - spark.mask_ratio)))
        if not 0 < visible < patches:
            raise ValueError(f"ssl.spark: {patches} patch(es) of {spark.patch_size} per crop {self.crop} at "
                             f"mask_ratio {spark.mask_ratio} leave nothing to reconstruct; use a smaller patch_size")
        return self
