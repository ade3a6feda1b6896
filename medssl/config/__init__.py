"""Validated, typed settings: one module per section, loading (YAML, `use:`, overrides) in loading.py.

Every name is re-exported here, so `from medssl.config import TrainConfig` works wherever a section lives."""
from __future__ import annotations

from medssl.config.base import Section
from medssl.config.data import DemoConfig, DataConfig, ManifestConfig
from medssl.config.cohort import LadderConfig, SplitConfig
from medssl.config.preprocess import PreprocessConfig
from medssl.config.pretrain import (EncoderConfig, ViewsConfig, ContrastiveConfig, MaskedConfig, VICRegConfig,
                                    DINOConfig, SparKConfig, SSLConfig, TrainConfig, PretrainConfig)
from medssl.config.segmentation import SegmentationConfig
from medssl.config.finetune import FinetuneConfig
from medssl.config.tracking import TrackingConfig
from medssl.config.evaluate import EvaluateConfig, ExternalSiteConfig
from medssl.config.pipeline import PipelineConfig
from medssl.config.loading import _read_yaml, _resolve_uses, apply_overrides, deep_merge, load_pipeline, validate
