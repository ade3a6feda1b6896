"""Fine-tuning at each rung: arms, protocols, inner validation, early stopping, thresholds, registration."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from medssl.config.base import Section
from medssl.config.pretrain import ViewsConfig
from medssl.config.segmentation import SegmentationConfig

ARMS = ("ssl", "scratch", "features", "random_features")


class FinetuneConfig(Section):
    task: Literal["classification", "segmentation"] = Field(
        "classification", description="classification: the label ladder; segmentation: the Dice ladder on masks")
    segmentation: SegmentationConfig = SegmentationConfig()
    protocols: list[Literal["linear", "finetune"]] = ["linear", "finetune"]
    arms: list[Literal["ssl", "scratch", "features", "random_features"]] = Field(
        list(ARMS), description="ssl; scratch (fine-tuned from random init, same tuning as ssl); features "
                                "(engineered image features + logistic regression); random_features (frozen "
                                "random encoder + the linear probe)")
    validation: Literal["inner", "split"] = Field(
        "inner", description="inner: epochs, probe C and threshold chosen by cross-validation inside the rung's "
                             "own patients (fine-tuning keeps the fold models as an ensemble; a probe is refitted "
                             "on the whole rung); split: on the labelled validation split (uses extra labels; "
                             "results say how many)")
    inner_folds: int = Field(3, ge=2, description="K of the inner, patient-level stratified cross-validation")
    workers: int = Field(1, ge=1, description="ladder children run in this many processes (torchrun ranks "
                                              "share the children out the same way)")
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    encoder_lr_scale: float = Field(0.1, gt=0, le=1)
    weight_decay: float = Field(1e-4, ge=0)
    imbalance: Literal["weighted_loss", "balanced_sampler", "none"] = "weighted_loss"
    patience: int = Field(5, ge=1)
    target_sensitivity: float | None = Field(None, gt=0, le=1)
    bootstrap: int = Field(1000, ge=10)
    register_model: bool = True
    log_models: Literal["all", "best", "none"] = Field(
        "best", description="log a child's model when it beats the rung's earlier runs (every model that could "
                            "be registered), every child's, or none")
    monitor: Literal["val_loss", "val_auroc"] = "val_loss"
    schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="fine-tuning lr: one warm-up epoch, then cosine decay over `epochs`; or constant")
    views: ViewsConfig | None = Field(None, description="random views of the training images (fine-tuning "
                                                        "protocol; made on the training device); none by default")
    slice_pooling: Literal["meanmax", "mean", "max", "central"] = Field(
        "meanmax", description="2D encoders on 3D volumes: every axial slice encoded and the slice features pooled "
                               "(meanmax: mean and max concatenated; mean; max) for the probe, fine-tuning, the "
                               "features arm and every kept model; central: the central axial slice only (a "
                               "lesion in another slice is invisible). No effect on 3D encoders or 2D images")
    seed: int = 0
