"""The whole pipeline file: one section per stage."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field

from medssl.config.base import Section
from medssl.config.cohort import SplitConfig
from medssl.config.data import DataConfig, ManifestConfig
from medssl.config.evaluate import EvaluateConfig
from medssl.config.finetune import FinetuneConfig
from medssl.config.preprocess import PreprocessConfig
from medssl.config.pretrain import PretrainConfig
from medssl.config.tracking import TrackingConfig


class PipelineConfig(Section):
    name: str
    scale: float = Field(1.0, gt=0, description="multiplies cohort size, steps and epochs (GPU: 10-100)")
    workdir: Path = Path(".medssl")
    data: DataConfig
    manifest: ManifestConfig = ManifestConfig()
    split: SplitConfig = SplitConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    pretrain: PretrainConfig = PretrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    tracking: TrackingConfig = TrackingConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
