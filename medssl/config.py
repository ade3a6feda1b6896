"""YAML -> validated, typed settings. The only module that parses YAML.

Every model forbids unknown keys, so a typo (`lerning_rate`) is an error naming the field instead of a
silently ignored setting. A YAML mapping may start with `use: other.yaml`: that file is loaded first (path
relative to the including file) and the remaining keys override it, which is how `pipelines/*.yaml` compose
the reusable pieces in `configs/`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medssl.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------- data
class DemoConfig(Section):
    """The embedded cohort, built offline from real anatomy shipped in packages (medssl/demo.py)."""
    subjects: int = Field(60, ge=4)
    positive_fraction: float = Field(0.1, gt=0, lt=1)
    dicom_fraction: float = Field(0.5, ge=0, le=1, description="share of subjects written as DICOM series")
    size: int = Field(48, ge=16, description="edge of the cubic pseudo-subject volume, voxels")
    seed: int = 0
    out: Path = Path(".medssl/demo_data")


class DataConfig(Section):
    folder: Path | None = None
    labels: Path | None = None
    demo: DemoConfig | None = None
    nifti_modality: str = Field("MR", description="modality recorded for NIfTI files, which carry none")

    @model_validator(mode="after")
    def _one_source(self):
        if self.folder is None and self.demo is None:
            raise ValueError("give data.folder (your images) or data.demo (the embedded demo cohort)")
        return self


class ManifestConfig(Section):
    out: Path = Path("data_manifests/dataset.csv")
    join_on: Literal["auto", "patient_id", "study_uid", "series_uid", "path"] = "auto"
    workers: int | None = Field(None, ge=1)
    max_image_mb: float = Field(4096, gt=0, description="refuse images whose declared size exceeds this")
    salt_env: str = Field("MEDSSL_SALT", description="environment variable holding the pseudonymisation salt")


class LadderConfig(Section):
    fractions: list[float] | None = None
    per_class: list[int] | None = None
    seeds: list[int] = [0, 1, 2]

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.fractions is None) == (self.per_class is None):
            raise ValueError("give exactly one of ladder.fractions or ladder.per_class")
        return self


class SplitConfig(Section):
    label: str = "label"
    seed: int = 0
    val_fraction: float = Field(0.2, ge=0, lt=1)
    test_fraction: float = Field(0.3, gt=0, lt=1)
    ladder: LadderConfig = LadderConfig(per_class=[5, 10, 25])


class PreprocessConfig(Section):
    spatial_dims: Literal[2, 3] = 3
    spacing: list[float] | None = Field(None, description="target spacing in mm; null keeps the native one")
    size: list[int] | None = Field(None, description="final shape after pad/crop; null keeps the resampled one")
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    mr_percentiles: tuple[float, float] = (1.0, 99.0)
    foreground_crop: bool = False
    slices_from_3d: bool = Field(False, description="2D models: draw 2D slices from 3D volumes")
    cache_dir: Path = Path(".medssl/cache")

    @model_validator(mode="after")
    def _dims(self):
        for name in ("spacing", "size"):
            value = getattr(self, name)
            if value is not None and len(value) != self.spatial_dims:
                raise ValueError(f"{name} has {len(value)} values but spatial_dims is {self.spatial_dims}")
        return self


# ------------------------------------------------------------------------------------------- models
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


class SSLConfig(Section):
    """Both keys set = reconstruction + contrastive (the MONAI tutorial's recipe)."""
    contrastive: ContrastiveConfig | None = None
    masked: MaskedConfig | None = None

    @model_validator(mode="after")
    def _at_least_one(self):
        if self.contrastive is None and self.masked is None:
            raise ValueError("choose at least one SSL objective: ssl.contrastive and/or ssl.masked")
        return self


class TrainConfig(Section):
    steps: int = Field(200, ge=1)
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


class PretrainConfig(Section):
    encoder: EncoderConfig = EncoderConfig()
    ssl: SSLConfig = SSLConfig(contrastive=ContrastiveConfig())
    views: ViewsConfig = ViewsConfig()
    train: TrainConfig = TrainConfig()
    crop: list[int] = Field([32, 32, 32], description="crop given to the model, voxels")


class FinetuneConfig(Section):
    protocols: list[Literal["linear", "finetune"]] = ["linear", "finetune"]
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
    seed: int = 0


class TrackingConfig(Section):
    experiment: str | None = Field(None, description="default: the pipeline name")
    tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else MLflow's default")
    server_wait_s: float = Field(60.0, ge=0, description="how long a stage waits for an unreachable tracking "
                                                         "server (e.g. restarting) to open its run")


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


# ------------------------------------------------------------------------------------------ loading
def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}", fix="check the path (relative to where you run medssl)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file is not valid YAML: {err}", where=str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError("config file must hold a mapping of settings", where=str(path))
    return _resolve_uses(data, path.parent)


def _resolve_uses(node: Any, base: Path) -> Any:
    """Replace every `{use: file, ...}` mapping by the file's content overridden by the other keys."""
    if isinstance(node, list):
        return [_resolve_uses(item, base) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _resolve_uses(value, base) for key, value in node.items()}
    if "use" in node:
        included = _read_yaml((base / str(node.pop("use"))).resolve())
        node = deep_merge(included, node)
    return node


def deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`a.b.c=value` strings from the command line; the value is parsed as YAML (so 3 is an int)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not KEY=VALUE", fix="write e.g. pretrain.train.steps=500")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return data


def validate(model: type[Section], data: dict, source: str) -> Section:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        lines = []
        for problem in err.errors():
            field = ".".join(str(p) for p in problem["loc"]) or "(top level)"
            message = "unknown key" if problem["type"] == "extra_forbidden" else problem["msg"]
            lines.append(f"{field}: {message}")
        raise ConfigError("invalid configuration:\n    " + "\n    ".join(lines), where=source,
                          fix="fix the named fields (see README 'Configuration reference')") from None


def load_pipeline(path: Path | str, overrides: list[str] = ()) -> PipelineConfig:
    path = Path(path)
    data = apply_overrides(_read_yaml(path), list(overrides))
    return validate(PipelineConfig, data, str(path))
