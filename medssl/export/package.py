"""The self-describing, pickle-free model: a folder with model.safetensors (weights only: tensors, no code)
and medssl-model.json (ModelSpec). Loading reads JSON and tensors and nothing else, so a model from another
team's registry cannot run code here; a folder whose weights do not match the recorded sha256, whose spec is
not medssl's, or whose tensors do not fit the architecture is refused."""
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


@dataclass
class ModelPackage:
    model: Classifier   # eval mode, on the CPU, threshold buffer = spec.threshold
    spec: ModelSpec
    folder: Path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_package(folder: Path | str, model: Classifier, spec: dict) -> Path:
    """Write `model` and its description (a ModelSpec as a dict, without weights_sha256) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / WEIGHTS_FILE, metadata={"format": "medssl-model/1"})
    binary = model.head.out_features == 2
    full = ModelSpec.model_validate({**spec, "threshold": float(model.threshold) if binary else None,
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
    arch = spec.architecture
    encoder = build_encoder(arch.encoder, arch.spatial_dims, arch.img_size)
    if arch.slice_pooling:  # scores a volume from all its slices, as the ladder child did
        encoder = SlicePooled(encoder, arch.slice_pooling)
    threshold = 0.5 if spec.threshold is None else spec.threshold
    model = Classifier(encoder, arch.n_classes, threshold=threshold, spatial_dims=arch.input_dims)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise _refuse(f"the weights do not fit the architecture (missing {result.missing_keys[:3]}, "
                      f"unexpected {result.unexpected_keys[:3]})", folder)
    model.threshold.fill_(threshold)
    return ModelPackage(model.eval(), spec, folder)


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
