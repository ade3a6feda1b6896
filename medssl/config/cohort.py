"""Patient-level splits and the label ladder's rungs."""
from __future__ import annotations

from pydantic import Field, model_validator

from medssl.config.base import Section


class LadderConfig(Section):
    fractions: list[float] | None = Field(None, description="share of the training patients of EVERY class")
    per_class: list[int] | None = Field(None, description="labelled PATIENTS of every class per rung (all of "
                                                          "a patient's images go with it)")
    seeds: list[int] = [0, 1, 2]

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.fractions is None) == (self.per_class is None):
            raise ValueError("give exactly one of ladder.fractions or ladder.per_class")
        return self


class SplitConfig(Section):
    label: str = "label"
    seed: int = 0
    val_fraction: float = Field(0.2, ge=0, lt=1, description="validation patients; used only with "
                                "finetune.validation: split (under inner validation they join the training pool)")
    test_fraction: float = Field(0.3, gt=0, lt=1)
    repeats: int = Field(3, ge=1, description="repeated patient-level splits: every rung x seed x arm runs on each "
                         "(split variance); repeat 0 is the split of `seed`")
    positive_class: str | int | None = Field(None, description="binary labels: the class that is the condition "
                                             "(its name or code); default the rarer class by patients")
    ladder: LadderConfig = LadderConfig(per_class=[5, 10, 25])
