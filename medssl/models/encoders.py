"""Encoder registry (MONAI networks, 2D and 3D) and the encoder file that pretraining hands to fine-tuning.

Every encoder maps (B, C, *spatial) -> (B, out_features) pooled features. The file format is a plain dict
(contracts.md "Encoder file") so it loads with torch.load alone, without medssl's classes being pickled.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from monai.networks.nets.resnet import ResNet, ResNetBlock, ResNetBottleneck
from torch import nn

from medssl.config import EncoderConfig
from medssl.errors import ConfigError, TrainingError
from medssl.models.vit import ViTEncoder

FORMAT = "medssl-encoder/1"
_PREFIXES = ("module.", "_orig_mod.")  # added by DDP and torch.compile wrappers


def _resnet(block: type[nn.Module], layers: list[int]) -> Callable[..., nn.Module]:
    def build(cfg: EncoderConfig, spatial_dims: int, img_size: list[int]) -> nn.Module:
        # `width` scales every stage's channels (1.0 = the published ResNet; 0.25 fits a CPU demo, 16x fewer FLOPs)
        planes = [max(8, round(base * cfg.width)) for base in (64, 128, 256, 512)]
        # stride-2 stem as in the 2D ResNet: MONAI's default stride 1 makes a 96^3 stem 8x the cost
        model = ResNet(block, layers, planes, spatial_dims=spatial_dims, n_input_channels=cfg.in_channels,
                       feed_forward=False, conv1_t_stride=2, conv1_t_size=7)
        model.out_features = planes[-1] * block.expansion  # avgpool + flatten of the last stage
        return model
    return build


def _vit(cfg: EncoderConfig, spatial_dims: int, img_size: list[int]) -> nn.Module:
    bad = [s for s in img_size if s % cfg.patch_size]
    if bad:
        raise ConfigError(f"crop/image size {img_size} is not divisible by the ViT patch size {cfg.patch_size}",
                          where="pretrain.crop / encoder.patch_size",
                          fix="choose a crop whose every edge is a multiple of patch_size (e.g. 96 with 16)")
    if cfg.hidden_size % cfg.num_heads:
        raise ConfigError(f"hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}",
                          where="encoder.hidden_size / encoder.num_heads", fix="e.g. 768 with 12 heads")
    return ViTEncoder(cfg.in_channels, list(img_size), cfg.patch_size, cfg.hidden_size, cfg.num_layers,
                      cfg.num_heads, cfg.mlp_dim, spatial_dims)


ENCODERS: dict[str, Callable[[EncoderConfig, int, list[int]], nn.Module]] = {
    "resnet10": _resnet(ResNetBlock, [1, 1, 1, 1]),
    "resnet18": _resnet(ResNetBlock, [2, 2, 2, 2]),
    "resnet34": _resnet(ResNetBlock, [3, 4, 6, 3]),
    "resnet50": _resnet(ResNetBottleneck, [3, 4, 6, 3]),
    "vit": _vit,
}


def build_encoder(cfg: EncoderConfig, spatial_dims: int, img_size: list[int]) -> nn.Module:
    if spatial_dims not in (2, 3):
        raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims}", where="preprocess.spatial_dims")
    if len(img_size) != spatial_dims:
        raise ConfigError(f"image/crop size {list(img_size)} has {len(img_size)} values for a {spatial_dims}D model",
                          where="pretrain.crop", fix=f"give {spatial_dims} values")
    if cfg.name not in ENCODERS:
        raise ConfigError(f"unknown encoder {cfg.name!r}", where="encoder.name", fix=f"one of {sorted(ENCODERS)}")
    return ENCODERS[cfg.name](cfg, spatial_dims, list(img_size))


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (repeatedly: a compiled DDP model has both)."""
    cleaned = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        cleaned[key] = value
    return cleaned


def save_encoder(path: str | Path, encoder: nn.Module, cfg: EncoderConfig, spatial_dims: int,
                 img_size: list[int], pretrain_run_id: str | None = None,
                 manifest_digest: str | None = None, **lineage) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in clean_state_dict(encoder.state_dict()).items()}
    payload = {"format": FORMAT, "encoder": cfg.model_dump(), "spatial_dims": int(spatial_dims),
               "img_size": [int(s) for s in img_size], "state_dict": state,
               "pretrain_run_id": pretrain_run_id, "manifest_digest": manifest_digest, **lineage}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: a crash mid-save never leaves a half-written encoder
    return path


def _local_file(source: str | Path) -> Path:
    text = str(source)
    if text.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        import mlflow
        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=text))
        except Exception as err:  # MLflow raises several types; the user needs the URI and the reason
            raise TrainingError(f"cannot download encoder from MLflow: {err}", where=text,
                                fix="check the run id / model name and MLFLOW_TRACKING_URI") from None
    path = Path(text)
    if not path.is_file():
        raise TrainingError("encoder file not found", where=text, fix="give the encoder.pt written by pretraining")
    return path


def _read_payload(path: Path) -> dict:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise TrainingError(f"cannot read encoder file: {err}", where=str(path)) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise TrainingError(f"not a {FORMAT} file", where=str(path),
                            fix="use medssl.models.encoders.save_encoder output (pretraining's encoder.pt)")
    return payload


def load_encoder(source: str | Path) -> tuple[nn.Module, dict]:
    """File path or MLflow URI -> (encoder with the saved weights, info dict without the state_dict)."""
    path = _local_file(source)
    payload = _read_payload(path)
    try:
        cfg = EncoderConfig.model_validate(payload["encoder"])
        encoder = build_encoder(cfg, int(payload["spatial_dims"]), list(payload["img_size"]))
    except (KeyError, TypeError, ValueError, ConfigError) as err:  # pydantic's ValidationError is a ValueError
        raise TrainingError(f"encoder file has invalid settings: {err}", where=str(source),
                            fix="re-save it with medssl.models.encoders.save_encoder") from None
    load_state_strict(encoder, payload["state_dict"], where=str(source))
    info = {k: v for k, v in payload.items() if k != "state_dict"}
    return encoder, info


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """load_state_dict(strict=True) with the differing keys (and shape mismatches) named in the error."""
    state = clean_state_dict(state)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        def show(keys):
            return ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "") or "none"
        raise TrainingError(
            f"encoder weights do not match the architecture: missing keys: {show(missing)}; "
            f"unexpected keys: {show(unexpected)}; shape mismatches: {show(shapes)}", where=where,
            fix="load with the encoder settings used in pretraining (the file's 'encoder' entry)")
    model.load_state_dict(state, strict=True)
