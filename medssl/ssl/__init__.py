"""SSL methods: each an nn.Module with `.encoder` and `forward(batch) -> {"loss": scalar, ...diagnostics}`.

The training loop calls `method(batch)["loss"].backward()` and never branches on the method; the method makes
its own random views on the batch's device (medssl.views), so `batch` holds only the loader's crops.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from medssl.config import PretrainConfig
from medssl.models.encoders import build_encoder
from medssl.ssl.combined import MaskedContrastive
from medssl.ssl.contrastive import SimCLR
from medssl.ssl.masked import MaskedAutoencoder


def _contrastive(encoder: nn.Module, cfg: PretrainConfig) -> nn.Module:
    return SimCLR(encoder, cfg.ssl.contrastive, cfg.views)


def _masked(encoder: nn.Module, cfg: PretrainConfig) -> nn.Module:
    return MaskedAutoencoder(encoder, cfg.ssl.masked, cfg.views)


def _both(encoder: nn.Module, cfg: PretrainConfig) -> nn.Module:
    return MaskedContrastive(encoder, cfg.ssl.masked, cfg.ssl.contrastive, cfg.views)


# key: (contrastive set, masked set)
METHODS: dict[tuple[bool, bool], Callable[[nn.Module, PretrainConfig], nn.Module]] = {
    (True, False): _contrastive,
    (False, True): _masked,
    (True, True): _both,
}


def method_name(cfg: PretrainConfig) -> str:
    """A short name for run tags: "contrastive", "masked" or "masked+contrastive"."""
    return {(True, False): "contrastive", (False, True): "masked", (True, True): "masked+contrastive"}[
        (cfg.ssl.contrastive is not None, cfg.ssl.masked is not None)]


def build_method(cfg: PretrainConfig, spatial_dims: int) -> nn.Module:
    """Encoder (built for cfg.crop) wrapped in the configured SSL objective(s)."""
    encoder = build_encoder(cfg.encoder, spatial_dims, cfg.crop)
    return METHODS[(cfg.ssl.contrastive is not None, cfg.ssl.masked is not None)](encoder, cfg)


__all__ = ["build_method", "method_name", "METHODS", "SimCLR", "MaskedAutoencoder", "MaskedContrastive"]
