"""Exports of a medssl model for deployment without medssl: ONNX (checked with onnxruntime), TorchScript, and
a MONAI bundle (configs/metadata.json + configs/inference.json + models/model.ts) that `monai.bundle` loads.

Each export is checked for parity with the PyTorch model on the same inputs before it is reported as done:
the largest absolute difference of the class probabilities must stay within TOLERANCE (float32 kernels differ
in summation order; probabilities, not logits, are what a user acts on)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from medssl.errors import TrainingError
from medssl.export.package import ModelPackage, example_input, input_size

TOLERANCE = 1e-4
FORMATS = ("onnx", "torchscript", "bundle")


class _Probabilities(torch.nn.Module):
    """The exported graph: (B, C, *size) float32 -> (B, K) class probabilities."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        # eval, and built in eval: exporters restore the wrapper's own mode afterwards, and a wrapper left in
        # its default training mode would switch the package's model to training (BatchNorm batch stats)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x), dim=1)


def _inputs(package: ModelPackage) -> torch.Tensor:
    return torch.cat([example_input(package.spec, seed) for seed in range(2)])  # (2, C, *size)


@torch.no_grad()
def _reference(package: ModelPackage, x: torch.Tensor) -> np.ndarray:
    return _Probabilities(package.model)(x).numpy()


def to_torchscript(package: ModelPackage, out: Path) -> Path:
    traced = torch.jit.trace(_Probabilities(package.model), example_input(package.spec), check_trace=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    traced.save(str(out))
    return out


def to_onnx(package: ModelPackage, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    image_axes = {0: "batch", **({4: "slices"} if package.spec.architecture.slice_pooling else {})}
    torch.onnx.export(_Probabilities(package.model), (example_input(package.spec),), str(out),
                      input_names=["image"], output_names=["probabilities"], dynamo=False, opset_version=17,
                      dynamic_axes={"image": image_axes, "probabilities": {0: "batch"}})
    return out


def to_bundle(package: ModelPackage, out: Path) -> Path:
    """A MONAI bundle: TorchScript network (with the medssl spec as its extra metadata) and the configs."""
    from monai.data import save_net_with_metadata
    spec = package.spec
    (out / "models").mkdir(parents=True, exist_ok=True)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    traced = torch.jit.trace(_Probabilities(package.model), example_input(spec), check_trace=False)
    meta = bundle_metadata(package)
    save_net_with_metadata(traced, str(out / "models" / "model"), meta_values=meta,     # writes model.ts
                           more_extra_files={"medssl-model.json": json.dumps(spec.model_dump(mode="json")).encode()})
    (out / "configs" / "metadata.json").write_text(json.dumps(meta, indent=1))
    inference = {"bundle_root": ".", "device": "$torch.device('cpu')",
                 "network_def": "$torch.jit.load(@bundle_root + '/models/model.ts', map_location=@device)",
                 "network": "$@network_def.eval()"}
    (out / "configs" / "inference.json").write_text(json.dumps(inference, indent=1))
    return out


def bundle_metadata(package: ModelPackage) -> dict:
    spec = package.spec
    arch = spec.architecture
    size = [1, arch.in_channels, *input_size(spec)]
    return {"version": "0.1.0", "changelog": {"0.1.0": "exported by medssl"}, "monai_version": _monai_version(),
            "pytorch_version": torch.__version__.split("+")[0], "numpy_version": np.__version__,
            "task": "classification", "description": f"medssl {arch.describe()} classifier of "
                                                     f"'{spec.labels.column}' ({', '.join(spec.labels.names)})",
            "authors": "medssl", "copyright": "the model owner", "network_data_format": {
                "inputs": {"image": {"type": "image", "format": "magnitude", "num_channels": arch.in_channels,
                                     "spatial_shape": input_size(spec), "dtype": "float32", "value_range": [],
                                     "is_patch_data": False, "channel_def": {"0": "image"}}},
                "outputs": {"pred": {"type": "probabilities", "format": "classes", "num_channels": arch.n_classes,
                                     "spatial_shape": [arch.n_classes], "dtype": "float32", "value_range": [0, 1],
                                     "is_patch_data": False,
                                     "channel_def": {str(i): n for i, n in enumerate(spec.labels.names)}}}},
            "medssl": {"threshold": spec.threshold, "positive": spec.labels.positive,
                       "preprocess": spec.preprocess.model_dump(mode="json"), "input_shape": size}}


def _monai_version() -> str:
    import monai
    return monai.__version__


def export(package: ModelPackage, fmt: str, out: Path) -> dict:
    """Write the export, load it back with its own runtime and compare it with PyTorch; returns the parity."""
    out = Path(out)
    if fmt not in FORMATS:
        raise TrainingError(f"unknown export format {fmt!r}", where="--format", fix=f"choose from {FORMATS}")
    if package.spec.architecture.features is not None:  # numpy / scikit-image features: nothing to trace
        raise TrainingError(f"an engineered-features model has no {fmt} form (its features are computed with "
                            "numpy and scikit-image, outside any graph)", where=str(package.folder),
                            fix="serve the package itself: the MLflow pyfunc, `medssl predict` or `medssl evaluate`")
    x = _inputs(package)
    want = _reference(package, x)
    if fmt == "onnx":
        path = to_onnx(package, out)
        got = _run_onnx(path, x)
    elif fmt == "torchscript":
        path = to_torchscript(package, out)
        got = torch.jit.load(str(path)).eval()(x).detach().numpy()
    else:
        path = to_bundle(package, out)
        got = load_bundle_network(path)(x).detach().numpy()
    diff = float(np.abs(got - want).max())
    if not diff <= TOLERANCE:
        raise TrainingError(f"the {fmt} export differs from the PyTorch model by {diff:.2e} (> {TOLERANCE})",
                            where=str(path), fix="report this model's architecture to the medssl developers")
    return {"format": fmt, "path": str(path), "max_abs_diff": diff, "tolerance": TOLERANCE}


def _run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"image": x.numpy()})[0]


def load_bundle_network(bundle: Path) -> torch.nn.Module:
    """The bundle's network as MONAI builds it from configs/inference.json."""
    from monai.bundle import ConfigParser
    parser = ConfigParser()
    parser.read_config(str(Path(bundle) / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    return parser.get_parsed_content("network")
