"""SSL methods: each an nn.Module (ssl/base.SSLMethod) with `.encoder`, `forward(batch) -> {"loss": scalar,
...diagnostics}` and `after_step()`.

The training loop calls `method(batch)["loss"].backward()`, then `method.after_step()` after each optimizer
update, and never branches on the method; the method makes its own random views on the batch's device
(medssl.augment.views), so `batch` holds only the loader's crops.
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


def _vicreg(encoder: nn.Module, cfg: PretrainConfig) -> nn.Module:
    from medssl.ssl.vicreg import VICReg
    return VICReg(encoder, cfg.ssl.vicreg, cfg.views)


def _dino(encoder: nn.Module, cfg: PretrainConfig) -> nn.Module:
    from medssl.ssl.dino import DINO
    return DINO(encoder, cfg.ssl.dino, cfg.views)


def _spark(encoder: nn.Module, cfg: PretrainConfig) -> nn.Module:
    from medssl.ssl.spark import SparK
    return SparK(encoder, cfg.ssl.spark, cfg.views, len(cfg.crop))


# key: the configured objectives (SSLConfig.objectives(), field order) -> (name for run tags, builder)
METHODS: dict[tuple[str, ...], tuple[str, Callable[[nn.Module, PretrainConfig], nn.Module]]] = {
    ("contrastive",): ("contrastive", _contrastive),
    ("masked",): ("masked", _masked),
    ("contrastive", "masked"): ("masked+contrastive", _both),
    ("vicreg",): ("vicreg", _vicreg),
    ("dino",): ("dino", _dino),
    ("spark",): ("spark", _spark),
}


def method_name(cfg: PretrainConfig) -> str:
    """A short name for run tags: "contrastive", "masked", "masked+contrastive", "vicreg", "dino" or "spark"."""
    return METHODS[cfg.ssl.objectives()][0]


def build_method(cfg: PretrainConfig, spatial_dims: int) -> nn.Module:
    """Encoder (built for cfg.crop) wrapped in the configured SSL objective(s)."""
    from medssl.models.encoders import build_encoder
    encoder = build_encoder(cfg.encoder, spatial_dims, cfg.crop)
    return METHODS[cfg.ssl.objectives()][1](encoder, cfg).seed_views(cfg.train.seed)


__all__ = ["build_method", "method_name", "METHODS"]
