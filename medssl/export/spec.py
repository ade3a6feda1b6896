"""What a medssl model says about itself (medssl-model.json): architecture, the preprocessing it needs, its
labels and operating point, and where it came from. Validated like every config: an unknown key, a missing
field or a wrong type refuses the file, so a model that is not medssl's never gets as far as its weights."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from medssl.config.base import Section
from medssl.config.preprocess import PreprocessConfig
from medssl.config.pretrain import EncoderConfig

FORMAT = "medssl-model/1"
SPEC_FILE = "medssl-model.json"
WEIGHTS_FILE = "model.safetensors"


class EngineeredFeatures(Section):
    """The features arm's extractor (models/engineered.py): its fixed part by name, its settings by value."""
    extractor: Literal["medssl-engineered/1"] = Field(description="the extraction code's version")
    n_features: int = Field(ge=1, description="features per image (the probe's width)")
    grids: list[int] = Field(description="cells per axis of the pooled intensities")
    quantiles: list[float] = Field(description="intensity quantiles")
    glcm_levels: int = Field(ge=2, le=256, description="grey levels of the co-occurrence matrix")
    glcm_props: list[Literal["contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM"]]


class Architecture(Section):
    encoder: EncoderConfig | None = Field(None, description="the deep encoder (none: an engineered-features "
                                                            "model)")
    features: EngineeredFeatures | None = Field(None, description="the engineered-features extractor, instead of an "
                                                                  "encoder (the ladder's non-deep features arm)")
    members: int = Field(1, ge=1, description="classifiers whose mean class probability is the output (a "
                                              "fine-tuned rung keeps its inner-CV fold models); 1 = a single one")
    spatial_dims: Literal[2, 3] = Field(description="the encoder's dimensionality (a features model: that of the "
                                                    "ladder's encoder; input_dims says what it reads)")
    img_size: list[int]
    in_channels: int = Field(1, ge=1)
    n_classes: int = Field(ge=2)
    slice_pooling: Literal["mean", "max", "meanmax"] | None = Field(
        None, description="a 2D encoder that scores whole 3D volumes: every axial slice encoded, the slice "
                          "features pooled this way (models/slices.py); none: the model reads spatial_dims-D "
                          "input (a 2D one: the central axial slice of a volume)")
    slices: int | None = Field(None, ge=1, description="slice-pooled models: the axial slices of the training "
                                                       "volumes (the exports' example depth; any depth is scored)")

    @property
    def input_dims(self) -> int:
        """Dimensionality of what the model is fed: 3 for a slice-pooled 2D encoder."""
        return 3 if self.slice_pooling else self.spatial_dims

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.encoder is None) == (self.features is None):
            raise ValueError("give exactly one of encoder (a deep model) and features (engineered features)")
        if self.features is not None and self.members != 1:
            raise ValueError("an engineered-features model is a single probe (members: 1)")
        return self

    def describe(self) -> str:
        """A model's kind in words (model cards, bundle descriptions)."""
        if self.features is not None:
            return "engineered-features logistic regression"
        return self.encoder.name + (f" ensemble of {self.members}" if self.members > 1 else "")


class Labels(Section):
    column: str = Field(description="the labels CSV column the model was trained on")
    names: list[str] = Field(description="class names in logit order")
    positive: str | None = Field(None, description="binary models: the condition (the class scores describe)")


class Lineage(Section):
    pretrain_run_id: str = ""
    manifest_digest: str = ""
    rung: str = ""
    arm: str = ""
    seed: int | None = None
    protocol: str = ""
    training_run_id: str = ""
    labelled_patients: int | None = None


class Inputs(Section):
    modalities: list[str] = Field(default_factory=list, description="modalities seen in training (empty: any)")
    image_dims: list[int] = Field(default_factory=list, description="dimensionality of the training scans "
                                                                    "(2, 3); a 2D model may read 3D scans")


class ModelSpec(Section):
    format: Literal["medssl-model/1"] = FORMAT
    architecture: Architecture
    preprocess: PreprocessConfig = Field(description="the chain the training images went through, replayed on "
                                                     "every scan given to the model")
    labels: Labels
    inputs: Inputs = Inputs()
    threshold: float | None = Field(0.5, ge=0, le=1, description="binary operating point chosen inside the "
                                                                 "rung; none for multi-class (argmax)")
    lineage: Lineage = Lineage()
    weights_sha256: str = Field(description="sha256 of model.safetensors: a changed file is refused")
