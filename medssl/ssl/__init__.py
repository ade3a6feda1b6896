"""SSL methods: each an nn.Module with `.encoder` and `forward(batch) -> {"loss": scalar, ...diagnostics}`.

The training loop calls `method(batch)["loss"].backward()` and never branches on the method; the method makes
its own random views on the batch's device (medssl.views), so `batch` holds only the loader's crops.
Builders import their module when called: `import medssl.ssl.losses` (e.g. in a spawned process) then does
not pull in MONAI's networks.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from medssl.config import PretrainConfig


def _contrastive(encoder: nn.Module, cfg: PretrainConfig) -> nn.Module:
    from medssl.ssl.contrastive import SimCLR
    return SimCLR(encoder, cfg.ssl.contrastive, cfg.views)


def _masked(encoder: nn.Module, cfg: PretrainConfig) -> nn.Module:
    from medssl.ssl.masked import MaskedAutoencoder
    return MaskedAutoencoder(encoder, cfg.ssl.masked, cfg.views)


def _both(encoder: nn.Module, cfg: PretrainConfig) -> nn.Module:
    from medssl.ssl.combined import MaskedContrastive
    return MaskedContrastive(encoder, cfg.ssl.masked, cfg.ssl.contrastive, cfg.views)


# key: (contrastive set, masked set) -> (name for run tags, builder)
METHODS: dict[tuple[bool, bool], tuple[str, Callable[[nn.Module, PretrainConfig], nn.Module]]] = {
    (True, False): ("contrastive", _contrastive),
    (False, True): ("masked", _masked),
    (True, True): ("masked+contrastive", _both),
}


def _key(cfg: PretrainConfig) -> tuple[bool, bool]:
    return cfg.ssl.contrastive is not None, cfg.ssl.masked is not None


def method_name(cfg: PretrainConfig) -> str:
    """A short name for run tags: "contrastive", "masked" or "masked+contrastive"."""
    return METHODS[_key(cfg)][0]


def build_method(cfg: PretrainConfig, spatial_dims: int) -> nn.Module:
    """Encoder (built for cfg.crop) wrapped in the configured SSL objective(s)."""
    from medssl.models.encoders import build_encoder
    encoder = build_encoder(cfg.encoder, spatial_dims, cfg.crop)
    return METHODS[_key(cfg)][1](encoder, cfg)


__all__ = ["build_method", "method_name", "METHODS"]
