"""Score a trained classifier: external validation on another manifest, and plain predictions for new scans.

A model source is a medssl model package (medssl/export: safetensors + JSON), as a folder, an MLflow
pyfunc folder or an MLflow URI ("runs:/<id>/model", "models:/<name>/<version>"), or a plain-dict classifier
file written by `save_classifier`. Nothing is unpickled. Binary calls use the operating point
chosen on the ORIGINAL validation split (stored in the model), never one re-tuned on the data being scored.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medssl.errors import DataError, TrainingError
from medssl.evaluate import plots
from medssl.evaluate.metrics import classification_metrics, confusion_from_metrics, positive_scores
from medssl.models.classifier import Classifier
from medssl.models.slices import SlicePooled
from medssl.ingest.csv_safe import write_csv

FORMAT = "medssl-classifier/1"


def save_classifier(path: Path, model: Classifier, encoder_info: dict) -> Path:
    """Plain dict (like the encoder file): loads with torch.load alone, no pickled classes. One Classifier only:
    ensembles and engineered-features models are kept as packages (export/package.py)."""
    if not isinstance(model, Classifier):
        raise TrainingError(f"a {type(model).__name__} has no classifier-file form", where=str(path),
                            fix="save it with medssl.export.package.save_package")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pooled = model.encoder.pool if isinstance(model.encoder, SlicePooled) else None  # reads whole volumes
    payload = {"format": FORMAT, "encoder": encoder_info["encoder"], "spatial_dims": encoder_info["spatial_dims"],
               "img_size": encoder_info["img_size"], "n_classes": model.n_classes, "slice_pooling": pooled,
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    torch.save(payload, path)
    return path


def load_model(source: str | Path, tracking_uri: str | None = None) -> Classifier:
    """A medssl model package (folder, MLflow pyfunc folder, runs:/ or models:/ URI) or a plain-dict classifier
    file; nothing is unpickled (pickled MLflow models are refused). `tracking_uri` resolves the URIs."""
    from medssl.export.resolve import open_model
    text = str(source)
    if Path(text).is_file():
        return _load_classifier_file(Path(text))
    return open_model(text, tracking_uri).model


def _load_classifier_file(path: Path) -> Classifier:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain types only
    except Exception as err:  # noqa: BLE001 — a pickle with code is refused here too
        raise TrainingError(f"cannot load the classifier: {err}", where=str(path),
                            fix="give a model folder, runs:/<run id>/model or models:/<name>/<version>") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise TrainingError(f"not a {FORMAT} file", where=str(path), fix="use a file written by save_classifier")
    from medssl.config import EncoderConfig
    from medssl.models.encoders import build_encoder
    encoder = build_encoder(EncoderConfig.model_validate(payload["encoder"]), payload["spatial_dims"],
                            payload["img_size"])
    dims, pool = payload["spatial_dims"], payload.get("slice_pooling")  # files before slice pooling have none
    if pool:
        encoder, dims = SlicePooled(encoder, pool), 3
    model = Classifier(encoder, payload["n_classes"], spatial_dims=dims)
    model.load_state_dict(payload["state_dict"])
    return model.eval()


@torch.no_grad()
def score_dataset(model: Classifier, dataset, batch_size: int = 16) -> tuple[list[str], np.ndarray]:
    """(image ids, class probabilities (N, K)) in dataset order."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    check_input(model, dataset[0]["image"], device)
    ids, probs = [], []
    for batch in _same_shape_batches(dataset, batch_size):
        images = torch.stack([item["image"] for item in batch]).float().to(device)  # (B, C, *spatial)
        probs.append(torch.softmax(model(images), dim=1).cpu())
        ids.extend(item["image_id"] for item in batch)
    model.cpu()
    return ids, torch.cat(probs).numpy()


def _same_shape_batches(dataset, batch_size: int):
    """Consecutive items, up to `batch_size`, a new batch where the shape changes: a 2D pipeline keeps each
    volume's native slices, so a slice-pooled (or features) model may be given volumes one tensor cannot stack."""
    batch: list[dict] = []
    for i in range(len(dataset)):
        item = dataset[i]
        if batch and (len(batch) == batch_size or item["image"].shape != batch[0]["image"].shape):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def check_input(model: Classifier, sample: torch.Tensor, device) -> None:
    """DataError (not a shape trace from deep inside the network) when images do not fit the model."""
    dims = getattr(model, "spatial_dims", None)
    if dims is not None and sample.ndim - 1 != dims:
        raise DataError(f"the model is {dims}D but the images are {sample.ndim - 1}D (shape {tuple(sample.shape)})",
                        where="model input", fix="preprocess the images with the settings the model was trained on")
    try:
        model(sample[None].float().to(device))  # (1, C, *spatial)
    except RuntimeError as err:
        raise DataError(f"the model cannot take images of shape {tuple(sample.shape)}: {err}", where="model input",
                        fix="preprocess the images with the settings the model was trained on") from None


def prediction_frame(ids, probs: np.ndarray, threshold: float) -> pd.DataFrame:
    """image_id, score (binary) or score_<k> (multi-class), predicted class."""
    frame = pd.DataFrame({"image_id": list(ids)})
    scores = positive_scores(probs)
    if scores.ndim == 1:
        frame["score"] = scores
        frame["predicted"] = (scores >= threshold).astype(int)
    else:
        for k in range(scores.shape[1]):
            frame[f"score_{k}"] = scores[:, k]
        frame["predicted"] = scores.argmax(axis=1)
    return frame


def predict(model_source, cache, df: pd.DataFrame, out_csv: Path, batch_size: int = 16,
            tracking_uri: str | None = None) -> pd.DataFrame:
    """Predictions for every cached image of `df`; images missing from the cache are listed, not fatal."""
    model = load_model(model_source, tracking_uri)
    ids, missing = _cached_ids(cache, df["image_id"])
    # labels are unused when predicting; ImageDataset wants one per image
    ids_scored, probs = score_dataset(model, _dataset(cache, ids, [0] * len(ids), model), batch_size)
    frame = prediction_frame(ids_scored, probs, float(model.threshold))
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    write_csv(frame, out_csv)
    if missing:
        write_csv(pd.DataFrame({"image_id": missing, "reason": "not in the preprocessing cache"}),
                  out_csv.with_suffix(".skipped.csv"))
    return frame


def evaluate_model(model_source, cache, df: pd.DataFrame, label: str, out_dir: Path, tracker=None,
                   n_boot: int = 1000, seed: int = 0, batch_size: int = 16, codes: pd.Series | None = None,
                   class_names: dict | None = None) -> dict:
    """External validation: the ladder's metrics (patient-bootstrap CIs) on the labelled images of `df`.
    `codes`: the labels as TRAINING class codes (evaluate.external.training_codes matches them by name);
    default: the manifest's own codes."""
    from medssl.cohort.splits import label_codes
    out_dir = Path(out_dir)
    model = load_model(model_source, getattr(tracker, "tracking_uri", None))
    codes = label_codes(df, label) if codes is None else codes
    labelled = df[codes.notna()]
    ids, _ = _cached_ids(cache, labelled["image_id"])
    y_by_id = dict(zip(labelled["image_id"], codes[codes.notna()].astype(int)))
    n_classes = model.n_classes
    if not ids or max(y_by_id[i] for i in ids) >= n_classes:
        raise DataError(f"labels of column '{label}' do not fit the model's {n_classes} classes "
                        f"(or no labelled image is cached)", where=label, fix="check the label column")
    ids, probs = score_dataset(model, _dataset(cache, ids, [y_by_id[i] for i in ids], model), batch_size)
    y = np.array([y_by_id[i] for i in ids])
    groups = labelled.set_index("image_id").loc[ids, "patient_id"].tolist()
    values = classification_metrics(y, probs, float(model.threshold), groups=groups, n_boot=n_boot, seed=seed)
    paths = write_evaluation(out_dir, ids, y, probs, values, float(model.threshold), groups, class_names)
    if tracker is not None:  # its own run (a child of whatever run is open), never the training run
        with tracker.run("external-validation", tags={"medssl.stage": "evaluate", "medssl.model": str(model_source)}):
            tracker.log_params({"model": str(model_source), "label": label, "images": len(ids), "n_boot": n_boot})
            tracker.log_metrics({k: v for k, v in values.items() if np.isfinite(v)})
            for path in paths:
                tracker.log_artifact(path, "external_validation")
    return values


def write_evaluation(out_dir: Path, ids, y, probs, values: dict, threshold: float, groups=None,
                     class_names: dict | None = None) -> list[Path]:
    """predictions.csv (with patient_id when `groups` is given: the report's pooled bootstrap needs it),
    metrics.json and the ROC / PR / confusion-matrix images of one evaluated model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = prediction_frame(ids, probs, threshold)
    frame.insert(1, "label", y)
    if groups is not None:
        frame.insert(2, "patient_id", list(groups))
    write_csv(frame, out_dir / "predictions.csv")
    (out_dir / "metrics.json").write_text(json.dumps(values, indent=1))
    scores = positive_scores(probs)
    return [out_dir / "predictions.csv", out_dir / "metrics.json",
            plots.save(plots.roc_figure(y, scores), out_dir / "roc.png"),
            plots.save(plots.pr_figure(y, scores), out_dir / "pr.png"),
            plots.save(plots.confusion_figure(confusion_from_metrics(values), _names(class_names, probs.shape[1])),
                       out_dir / "confusion.png")]


def _names(class_names: dict | None, n_classes: int) -> list[str] | None:
    return [str(class_names.get(k, k)) for k in range(n_classes)] if class_names else None


def _cached_ids(cache, image_ids) -> tuple[list[str], list[str]]:
    ids = [str(i) for i in image_ids]
    return [i for i in ids if cache.has(i)], [i for i in ids if not cache.has(i)]


def _dataset(cache, ids, labels, model: Classifier):
    from medssl.train.loaders import ImageDataset
    return ImageDataset(cache, ids, labels, spatial_dims=getattr(model, "spatial_dims", None))
