"""From what a user names (a model folder, an MLflow model folder, runs:/ID/model, models:/NAME/VERSION) to
a loaded medssl model package — without unpickling anything. An MLflow model of any other kind (the pytorch
flavour pickles the whole module; a python_model pickles an object) is refused with the reason."""
from __future__ import annotations

from pathlib import Path

from medssl.errors import TrainingError
from medssl.export.package import ModelPackage, is_package, load_package
from medssl.export.pyfunc import package_in


def download(uri: str, tracking_uri: str | None) -> Path:
    """runs:/ or models:/<name>/<version> -> local MLflow model folder, against the given tracking store.
    (MLflow resolves models:/ against the process-wide registry, which a Tracker does not set.)"""
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient
    try:
        if uri.startswith("models:/"):
            name, _, version = uri[len("models:/"):].rstrip("/").rpartition("/")
            uri = MlflowClient(tracking_uri, tracking_uri).get_model_version_download_uri(name, version)
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri))
    except Exception as err:  # noqa: BLE001 — MLflow raises many types; the user needs the source and why
        raise TrainingError(f"cannot fetch the model: {err}", where=uri,
                            fix="check the run id / model name and version, and MLFLOW_TRACKING_URI") from None


def open_model(source: str | Path, tracking_uri: str | None = None) -> ModelPackage:
    text = str(source)
    folder = download(text, tracking_uri) if text.startswith(("runs:/", "models:/")) else Path(text)
    if is_package(folder):
        return load_package(folder)
    if (folder / "MLmodel").is_file():
        inner = package_in(folder)
        if inner is None:
            raise TrainingError("refused to load the model: an MLflow model that is not a medssl model package "
                                "(e.g. a pickled pytorch model, which could run code when loaded)", where=text,
                                fix="use a model registered by medssl >= 0.2, or re-export it with medssl")
        return load_package(inner)
    raise TrainingError("not a medssl model", where=text,
                        fix="give a model folder, runs:/<run id>/model or models:/<name>/<version>")
