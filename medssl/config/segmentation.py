"""Segmentation fine-tuning (finetune.task: segmentation): classes, patches, the fixed step budget."""
from __future__ import annotations

from pydantic import Field, field_validator

from medssl.config.base import Section


class SegmentationConfig(Section):
    classes: dict[int, str] = Field({1: "lesion"}, description="mask label value -> class name; 0 is background. "
                                    "A mask holding a value not named here is an error (not silently merged)")
    patch: list[int] | None = Field(None, description="training patch / sliding-window size in voxels; null = "
                                    "the encoder's pretraining size (a ViT must keep it; a ResNet: multiples of 32)")
    steps: int = Field(150, ge=1, description="optimizer steps per run, the same at every rung: a fixed budget, "
                       "so no choice needs labels outside the rung")
    batch_size: int = Field(4, ge=1, description="patches per step")
    pos_fraction: float = Field(0.67, ge=0, le=1, description="share of patches centred on foreground "
                                "(MONAI RandCropByPosNegLabel): foreground oversampling for small structures")
    lr: float = Field(2e-3, gt=0)
    feature_size: int = Field(16, ge=4, description="decoder width at full resolution (UNETR feature_size)")
    overlap: float = Field(0.25, ge=0, lt=1, description="sliding-window inference overlap")
    tolerance_mm: float = Field(2.0, gt=0, description="surface Dice tolerance")
    overlays: int = Field(3, ge=0, description="slices per overlay figure; figures for the first min(overlays, 3) test images of each run")

    @field_validator("classes")
    @classmethod
    def _foreground(cls, value: dict[int, str]) -> dict[int, str]:
        if not value or min(value) < 1:
            raise ValueError("classes names the foreground labels (1, 2, ...); 0 is the background")
        if sorted(value) != list(range(1, len(value) + 1)):
            raise ValueError(f"class labels must be 1..N without gaps, got {sorted(value)}")
        return value
