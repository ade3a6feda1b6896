"""The registered model as an MLflow pyfunc that takes scans: a DataFrame with a `path` column (DICOM series
folders, DICOM / NIfTI / PNG files) → one row per image found: `path`, `p_<class>` per class, `call`.

No Python object is pickled: the MLflow model folder holds the medssl model package (safetensors + JSON) as
its data, and MLmodel names this module as its loader (`loader_module`), so loading imports the installed
medssl and reads tensors — the artifact itself carries no code. `mlflow models serve --env-manager local`
serves it as is."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medssl.errors import DataError
from medssl.export.package import ModelPackage, load_package

DATA_DIR = "medssl_model"


def class_columns(package: ModelPackage) -> list[str]:
    return [f"p_{name}" for name in package.spec.labels.names]


class ScanClassifier:
    """What MLflow calls: predict(DataFrame with `path`) -> DataFrame of probabilities and calls."""

    def __init__(self, package: ModelPackage):
        self.package = package

    @torch.no_grad()
    def predict(self, model_input, params=None) -> pd.DataFrame:
        from medssl.export.scans import load_scans
        paths = _paths(model_input)
        work = Path(tempfile.mkdtemp(prefix="medssl-serve-"))
        try:
            sources, images = load_scans(paths, self.package.spec, work)       # N x (C, *size)
            # one scan at a time: a slice-pooled model's volumes may differ in their number of slices
            probs = torch.cat([torch.softmax(self.package.model(x[None]), dim=1) for x in images]).numpy()  # (N, K)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return calls_frame(self.package, sources, probs)


def calls_frame(package: ModelPackage, sources: list[str], probs: np.ndarray) -> pd.DataFrame:
    """Binary: the call is the positive class when its probability reaches the stored threshold; else argmax."""
    names = package.spec.labels.names
    frame = pd.DataFrame(probs, columns=class_columns(package))
    frame.insert(0, "path", sources)
    positive = package.spec.labels.positive
    if len(names) == 2 and positive in names:
        k = names.index(positive)
        frame["call"] = np.where(probs[:, k] >= package.spec.threshold, positive, names[1 - k])
    else:
        frame["call"] = [names[i] for i in probs.argmax(axis=1)]
    return frame


def _paths(model_input) -> list[str]:
    if isinstance(model_input, pd.DataFrame):
        if "path" not in model_input.columns:
            raise DataError(f"the input has columns {list(model_input.columns)}, not `path`", where="model input",
                            fix='send {"dataframe_split": {"columns": ["path"], "data": [["/scans/ct1"]]}}')
        return [str(p) for p in model_input["path"]]
    if isinstance(model_input, (list, tuple)):
        return [str(p) for p in model_input]
    if isinstance(model_input, dict) and "path" in model_input:
        value = model_input["path"]
        return [str(p) for p in (value if isinstance(value, (list, tuple)) else [value])]
    raise DataError(f"cannot read scan paths from a {type(model_input).__name__}", where="model input",
                    fix="give a DataFrame with a `path` column")


def _load_pyfunc(data_path: str) -> ScanClassifier:
    """MLflow's loader hook (MLmodel: loader_module = medssl.export.pyfunc)."""
    return ScanClassifier(load_package(data_path))


def save_pyfunc(package_folder: Path, out: Path, example_path: str | None = None) -> Path:
    """An MLflow model folder at `out` wrapping the package, with its signature (and an input example)."""
    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    import medssl
    package = load_package(package_folder)
    outputs = [ColSpec("string", "path")] + [ColSpec("double", c) for c in class_columns(package)]
    signature = ModelSignature(inputs=Schema([ColSpec("string", "path")]),
                               outputs=Schema(outputs + [ColSpec("string", "call")]))
    example = pd.DataFrame({"path": [example_path]}) if example_path else None
    mlflow.pyfunc.save_model(str(out), loader_module="medssl.export.pyfunc", data_path=str(package_folder),
                             signature=signature, input_example=example,
                             pip_requirements=[f"medssl=={medssl.__version__}",
                                               f"torch=={torch.__version__.split('+')[0]}"])
    return Path(out)


def package_in(mlflow_model: Path) -> Path | None:
    """The medssl package inside an MLflow pyfunc folder of ours, else None (any other MLflow flavour)."""
    import yaml
    mlmodel = Path(mlflow_model) / "MLmodel"
    if not mlmodel.is_file():
        return None
    flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
    if flavor.get("loader_module") != "medssl.export.pyfunc":
        return None
    return Path(mlflow_model) / flavor.get("data", DATA_DIR)
