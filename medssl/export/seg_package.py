"""The segmentation model on disk, pickle-free: model.safetensors (weights only) + medssl-segmenter.json
(architecture, classes, patch, preprocessing, lineage, the weights' sha256). Loading rebuilds the network
from the JSON (medssl.models: encoder + decoder) and loads the tensors strictly, so a folder from another
registry runs no code here and a weights file that does not fit its description is refused.

The classifier package (export/package.py, ModelSpec) describes a Classifier; a segmentation network has
other parts (decoder width, classes per voxel, a patch for sliding windows), hence its own small spec.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from medssl.config import EncoderConfig
from medssl.errors import TrainingError
from medssl.models.decoders import build_segmenter
from medssl.models.encoders import build_encoder, load_state_strict

FORMAT = "medssl-segmenter/1"
SPEC_FILE, WEIGHTS_FILE = "medssl-segmenter.json", "model.safetensors"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_from_spec(spec: dict) -> torch.nn.Module:
    arch = spec["architecture"]
    encoder = build_encoder(EncoderConfig.model_validate(arch["encoder"]), arch["spatial_dims"], arch["img_size"])
    return build_segmenter(encoder, arch["n_classes"], arch["spatial_dims"], arch["in_channels"],
                           arch["feature_size"])


def save_segmenter(folder: Path | str, net: torch.nn.Module, spec: dict) -> Path:
    """spec: {"architecture": {encoder, spatial_dims, img_size, in_channels, n_classes, feature_size},
    "classes", "patch", "preprocess", "lineage"} (plain JSON values)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, folder / WEIGHTS_FILE,
              metadata={"format": FORMAT})
    full = {**spec, "format": FORMAT, "weights_sha256": _sha256(folder / WEIGHTS_FILE)}
    (folder / SPEC_FILE).write_text(json.dumps(full, indent=1, default=str))
    return folder


def load_segmenter(folder: Path | str) -> tuple[torch.nn.Module, dict]:
    """(network in eval mode on the CPU, spec); TrainingError for a folder that is not this format."""
    folder = Path(folder)
    try:
        spec = json.loads((folder / SPEC_FILE).read_text())
    except (FileNotFoundError, ValueError) as err:
        raise TrainingError(f"not a medssl segmentation model: {err}", where=str(folder)) from None
    if spec.get("format") != FORMAT or spec.get("weights_sha256") != _sha256(folder / WEIGHTS_FILE):
        raise TrainingError("segmentation model refused: unknown format or weights that differ from the "
                            "recorded sha256", where=str(folder), fix="use a folder written by save_segmenter")
    net = build_from_spec(spec)
    load_state_strict(net, load_file(folder / WEIGHTS_FILE), where=str(folder))
    return net.eval(), spec
