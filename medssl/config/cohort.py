"""Patient-level splits and the label ladder's rungs."""
from __future__ import annotations

from pydantic import Field, model_validator

from medssl.config.base import Section


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
