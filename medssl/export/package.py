"""The self-describing, pickle-free model: a folder with model.safetensors (weights only: tensors, no code)
and medssl-model.json (ModelSpec). Loading reads JSON and tensors and nothing else, so a model from another
team's registry cannot run code here; a folder whose weights do not match the recorded sha256, whose spec is
not medssl's, or whose tensors do not fit the architecture is refused.

Three kinds, by the spec's architecture: a Classifier (encoder + linear head), an Ensemble of `members` such
Classifiers (a fine-tuned rung's inner-CV fold models, mean probability), and a FeaturesClassifier (the non-deep
arm: engineered-feature settings in the JSON, standardisation and logistic coefficients as float64 tensors)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medssl.errors import TrainingError
from medssl.export.spec import SPEC_FILE, WEIGHTS_FILE, ModelSpec
from medssl.models.classifier import Classifier
from medssl.models.encoders import build_encoder
from medssl.models.slices import SlicePooled
from medssl.models.ensemble import Ensemble
from medssl.models.features_model import FeaturesClassifier


@dataclass
class ModelPackage:
    model: Classifier | Ensemble | FeaturesClassifier   # eval mode, on the CPU, threshold buffer = spec.threshold
    spec: ModelSpec
    folder: Path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_package(folder: Path | str, model: Classifier | Ensemble | FeaturesClassifier, spec: dict) -> Path:
    """Write `model` and its description (a ModelSpec as a dict, without weights_sha256) into `folder`; the
    threshold, the ensemble's size and the features' settings are taken from the model itself."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / WEIGHTS_FILE, metadata={"format": "medssl-model/1"})
    binary = model.n_classes == 2
    arch = {**spec["architecture"], "members": len(model.members) if isinstance(model, Ensemble) else 1}
    if isinstance(model, FeaturesClassifier):
        arch = {**{k: v for k, v in arch.items() if k != "encoder"}, "features": model.describe()}
    full = ModelSpec.model_validate({**spec, "architecture": arch,
                                     "threshold": float(model.threshold) if binary else None,
                                     "weights_sha256": _sha256(folder / WEIGHTS_FILE)})
    (folder / SPEC_FILE).write_text(json.dumps(full.model_dump(mode="json"), indent=1))
    return folder


def _refuse(what: str, folder: Path, fix: str = "use a model folder written by medssl (save_package / the ladder)"):
    return TrainingError(f"refused to load the model: {what}", where=str(folder), fix=fix)


def read_spec(folder: Path | str) -> ModelSpec:
    folder = Path(folder)
    try:
        return ModelSpec.model_validate_json((folder / SPEC_FILE).read_text())
    except FileNotFoundError:
        raise _refuse(f"no {SPEC_FILE} (not a medssl model)", folder) from None
    except (ValidationError, UnicodeDecodeError, ValueError) as err:
        first = err.errors()[0] if isinstance(err, ValidationError) else {"loc": (), "msg": str(err)}
        field = ".".join(str(p) for p in first["loc"])
        raise _refuse(f"{SPEC_FILE} is not a medssl model description ({field}: {first['msg']})", folder) from None


def load_package(folder: Path | str) -> ModelPackage:
    """The Classifier and its spec; TrainingError (never code execution) for anything that is not intact."""
    folder = Path(folder)
    spec = read_spec(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise _refuse(f"no {WEIGHTS_FILE}", folder)
    if _sha256(weights) != spec.weights_sha256:
        raise _refuse(f"{WEIGHTS_FILE} does not match the sha256 in {SPEC_FILE} (changed after export)", folder,
                      fix="get the model again from its registry; never edit a model folder by hand")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError) as err:
        raise _refuse(f"{WEIGHTS_FILE} is not a safetensors file ({err})", folder) from None
    threshold = 0.5 if spec.threshold is None else spec.threshold
    model = build_model(spec, threshold)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor of the wrong shape (e.g. another number of features)
        raise _refuse(f"the weights do not fit the architecture ({str(err).splitlines()[-1].strip()})",
                      folder) from None
    if result.missing_keys or result.unexpected_keys:
        raise _refuse(f"the weights do not fit the architecture (missing {result.missing_keys[:3]}, "
                      f"unexpected {result.unexpected_keys[:3]})", folder)
    model.threshold.fill_(threshold)
    return ModelPackage(model.eval(), spec, folder)


def build_model(spec: ModelSpec, threshold: float) -> Classifier | Ensemble | FeaturesClassifier:
    """The untrained network the spec describes (weights are loaded by the caller)."""
    arch = spec.architecture
    if arch.features is not None:  # fed what the ladder's features arm read (whole volumes when slice-pooled)
        settings = arch.features.model_dump(exclude={"extractor", "n_features"})
        return FeaturesClassifier(arch.features.n_features, arch.n_classes, settings, threshold, arch.input_dims)
    members = []
    for _ in range(arch.members):
        encoder = build_encoder(arch.encoder, arch.spatial_dims, arch.img_size)
        if arch.slice_pooling:  # scores a volume from all its slices, as the ladder child did
            encoder = SlicePooled(encoder, arch.slice_pooling)
        members.append(Classifier(encoder, arch.n_classes, threshold=threshold, spatial_dims=arch.input_dims))
    return members[0] if arch.members == 1 else Ensemble(members, threshold)


def is_package(folder: Path | str) -> bool:
    return (Path(folder) / SPEC_FILE).is_file()


def input_size(spec: ModelSpec) -> list[int]:
    """The spatial size of what the model is fed: the preprocessing's fixed size (what every training image
    was cropped/padded to), else the encoder's own (a ViT's img_size); a slice-pooled model's volumes add the
    axial slices of its training volumes (the preprocessing keeps each volume's native slices)."""
    arch = spec.architecture
    size = list(spec.preprocess.size or arch.img_size)
    return size + [arch.slices or 1] if arch.slice_pooling else size


@torch.no_grad()
def example_input(spec: ModelSpec, seed: int = 0) -> torch.Tensor:
    """(1, C, *input_size) standard-normal input, the shape the model's exports are traced and checked with."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((1, spec.architecture.in_channels, *input_size(spec)), generator=generator)
