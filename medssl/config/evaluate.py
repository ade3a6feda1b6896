"""Evaluation beyond the ladder's own test splits: external sites scored by every arm's models."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from medssl.config.base import Section


class ExternalSiteConfig(Section):
    """One external set: indexed, preprocessed like the training data in its own cache, scored by every arm."""
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="short site name (report rows, MLflow keys)")
    folder: Path | None = Field(None, description="folder of DICOM / NIfTI files to index (like data.folder)")
    manifest: Path | None = Field(None, description="an existing medssl manifest CSV instead of a folder")
    labels: Path | None = Field(None, description="labels CSV joined to the folder's images (like data.labels); "
                                                  "class names must be the training ones")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.folder is None) == (self.manifest is None):
            raise ValueError(f"external site '{self.name}': give exactly one of folder or manifest")
        if self.manifest is not None and self.labels is not None:
            raise ValueError(f"external site '{self.name}': labels go with folder (a manifest holds its labels)")
        return self


class EvaluateConfig(Section):
    external: list[ExternalSiteConfig] = Field(
        [], description="external sites shown beside the internal test splits, with paired deltas")
    batch_size: int = Field(16, ge=1, description="images per batch when scoring external sites")

    @model_validator(mode="after")
    def _unique_names(self):
        names = [site.name for site in self.external]
        doubled = sorted({n for n in names if names.count(n) > 1} | ({"internal"} & set(names)))
        if doubled:
            raise ValueError(f"external site names must be unique and not 'internal': {doubled}")
        return self
