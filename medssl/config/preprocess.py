"""Decoding, orientation, spacing, normalisation and the cache."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from medssl.config.base import Section


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


