"""Encoder + linear head, trained under one of two protocols, with checks before any training starts.

Protocols
- "linear": the encoder is frozen; its features are computed ONCE for the train and validation images and a
  converged, standardised scikit-learn logistic regression (strength chosen on validation) is fitted on them,
  then folded into the torch head (models/probe.py), so the head lives in the same Classifier that is saved,
  logged to MLflow and scored by `predict`, with one code path for binary and multi-class.
- "finetune": encoder and head train together (AdamW, one warm-up epoch then cosine decay); the encoder's
  learning rate is lr * encoder_lr_scale so the pretrained features are adjusted, not overwritten; optional
  random views of the training images (finetune.views), drawn from the run's seed.
Fine-tuning stops early on the validation loss (or AUROC) after `patience` epochs and keeps the best epoch's
weights; the probe picks its regularisation strength by the same validation score.
The binary operating point is chosen on the validation split and stored in the model (`threshold` buffer);
the test split is never looked at here.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from medssl.config import FinetuneConfig
from medssl.errors import ConfigError, DataError, TrainingError
from medssl.evaluate.metrics import choose_threshold, positive_scores
from medssl.models.classifier import Classifier
from medssl.models.probe import fit_probe_head

PROTOCOLS = ("linear", "finetune")


@dataclass
class FitResult:
    model: Classifier
    threshold: float
    val_loss: float
    val_auroc: float
    epochs: int
    history: list[dict] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ checks
def check_images(encoder: nn.Module, sample: torch.Tensor, spatial_dims: int, in_channels: int, where: str):
    """Raise DataError when images and encoder disagree, before a single step is spent."""
    spatial = tuple(sample.shape[1:])  # sample: (C, *spatial)
    if len(spatial) != spatial_dims:
        raise DataError(f"the encoder is {spatial_dims}D but the images are {len(spatial)}D "
                        f"(shape {tuple(sample.shape)})", where=where,
                        fix=f"use a {len(spatial)}D encoder or set preprocess.spatial_dims={spatial_dims}")
    if sample.shape[0] != in_channels:
        raise DataError(f"the encoder expects {in_channels} channel(s) but the images have {sample.shape[0]}",
                        where=where, fix="match encoder.in_channels to the preprocessed images")
    try:
        with torch.no_grad():
            encoder.eval()(sample[None].float().to(_device_of(encoder)))  # (1, C, *spatial)
    except RuntimeError as err:
        raise DataError(f"the encoder cannot take images of shape {tuple(sample.shape)}: {err}", where=where,
                        fix="set preprocess.size to the encoder's input size") from None


def check_labels(splits: dict, n_classes: int, rung: str, class_names: dict | None = None):
    """Every class must be in the rung's training subset, in validation (thresholds, early stopping) and in
    test (AUROC). `splits`: {"training subset": labels, "validation split": labels, ...}."""
    names = class_names or {}
    if n_classes < 2:
        raise DataError("fewer than two classes are labelled", where=f"rung {rung}",
                        fix="label at least one image of each class")
    for split, y in splits.items():
        if len(y) == 0:
            raise DataError(f"the {split} of rung {rung} has no labelled images", where=f"rung {rung}",
                            fix="check the label column, the splits and the preprocessing cache")
        missing = sorted(set(range(n_classes)) - set(np.asarray(y, int).tolist()))
        if missing:
            shown = ", ".join(f"{c} ({names[c]})" if c in names else str(c) for c in missing)
            raise DataError(f"the {split} of rung {rung} lacks class {shown}", where=f"rung {rung}",
                            fix="use a larger rung (more labels per class) or another split seed")


# ---------------------------------------------------------------------------------------- training
def fit(encoder: nn.Module, train_ds: Dataset, val_ds: Dataset, n_classes: int, protocol: str,
        cfg: FinetuneConfig, seed: int, monitor: str = "val_loss", device: str | None = None,
        spatial_dims: int | None = None) -> FitResult:
    """Train a Classifier on `train_ds`, early-stopped and thresholded on `val_ds` (datasets yield dicts)."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}", where="finetune.protocols", fix=f"one of {PROTOCOLS}")
    if monitor not in ("val_loss", "val_auroc"):
        raise ConfigError(f"unknown early-stopping monitor {monitor!r}", fix="val_loss or val_auroc")
    torch.manual_seed(seed)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = Classifier(encoder, n_classes, spatial_dims=spatial_dims).to(device)
    y_train = labels_of(train_ds)
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(y_train, n_classes, cfg.imbalance).to(device))
    if protocol == "linear":
        for p in model.encoder.parameters():
            p.requires_grad_(False)
        # a caller may pass FeatureSets it computed once for many runs (the ladder does, per encoder)
        train_ds, val_ds = (d if isinstance(d, FeatureSet) else features(model.encoder, d, cfg.batch_size)
                            for d in (train_ds, val_ds))
        best = _linear_probe(model.head, train_ds, val_ds, n_classes, cfg, loss_fn, monitor, device, seed)
    else:
        groups = [{"params": model.encoder.parameters(), "lr": cfg.lr * cfg.encoder_lr_scale},
                  {"params": model.head.parameters(), "lr": cfg.lr}]
        optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        loader = train_loader(train_ds, y_train, cfg, seed)
        scheduler = _schedule(optimizer, cfg, len(loader))
        best = _early_stopped(model, loader, val_ds, optimizer, scheduler, loss_fn, cfg, monitor, device, seed)
        model.load_state_dict(best["state"])
    threshold = _validation_threshold(best["val_scores"], best["val_y"], cfg.target_sensitivity)
    model.threshold.fill_(threshold)
    return FitResult(model.cpu().eval(), threshold, best["val_loss"], best["val_auroc"], best["epoch"],
                     best["history"])


def _linear_probe(head, train_ds, val_ds, n_classes, cfg, loss_fn, monitor, device, seed) -> dict:
    """Converged logistic regression on the frozen features (models/probe.py); strength chosen on validation."""
    def score(candidate):
        val = evaluate_loss(candidate, val_ds, loss_fn, cfg.batch_size, device)
        return (-val["loss"] if monitor == "val_loss" else val["auroc"]), val
    history = fit_probe_head(head, train_ds.feats.numpy(), train_ds.labels, n_classes, cfg.imbalance != "none",
                             score, seed)
    val = evaluate_loss(head, val_ds, loss_fn, cfg.batch_size, device)
    return {"epoch": len(history), "val_loss": val["loss"], "val_auroc": val["auroc"], "val_scores": val["probs"],
            "val_y": val["y"], "history": history}


def _schedule(optimizer, cfg: FinetuneConfig, steps_per_epoch: int):
    """Per-step lr factor: one epoch of linear warm-up, then cosine decay to 0 at `epochs` (or constant).
    With a handful of labelled images a constant lr keeps jumping around the minimum to the last epoch."""
    from medssl.train.schedule import warmup_cosine
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return warmup_cosine(optimizer, min(steps_per_epoch, total), total)


def _early_stopped(module, loader, val_ds, optimizer, scheduler, loss_fn, cfg, monitor, device, seed) -> dict:
    from medssl.augment.views import make_views
    best, history, waited = None, [], 0
    views = torch.Generator(device=device).manual_seed(seed)  # the views are part of the seed, like the order
    for epoch in range(1, cfg.epochs + 1):
        module.train()
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            images = batch["image"].float().to(device)
            if cfg.views is not None:
                images = make_views(images, cfg.views, views)
            loss = loss_fn(module(images), batch["label"].long().to(device))
            if not torch.isfinite(loss):  # weights are already damaged: stop instead of training on NaN
                raise TrainingError(f"non-finite training loss at epoch {epoch}", where="fine-tuning",
                                    fix="lower finetune.lr, or check the cached images for NaN/inf values")
            loss.backward()
            optimizer.step()
            scheduler.step()
        val = evaluate_loss(module, val_ds, loss_fn, cfg.batch_size, device)
        history.append({"epoch": epoch, "val_loss": val["loss"], "val_auroc": val["auroc"]})
        score = -val["loss"] if monitor == "val_loss" else val["auroc"]
        if best is None or score > best["score"]:
            best = {"score": score, "epoch": epoch, "val_loss": val["loss"], "val_auroc": val["auroc"],
                    "val_scores": val["probs"], "val_y": val["y"], "state": copy.deepcopy(module.state_dict())}
            waited = 0
        else:
            waited += 1
            if waited >= cfg.patience:
                break
    best["history"] = history
    return best


@torch.no_grad()
def evaluate_loss(module, dataset, loss_fn, batch_size: int, device) -> dict:
    from medssl.evaluate.metrics import classification_metrics
    module.eval()
    logits, labels = [], []
    for b in DataLoader(dataset, batch_size=batch_size):
        logits.append(module(b["image"].float().to(device)).cpu())
        labels.append(torch.as_tensor(b["label"]).long())
    logits, y = torch.cat(logits), torch.cat(labels)  # (N, K), (N,)
    probs = torch.softmax(logits, dim=1).numpy()
    loss = float(nn.functional.cross_entropy(logits, y, weight=loss_fn.weight.cpu()))
    auroc = classification_metrics(y.numpy(), probs)["auroc"]
    return {"loss": loss, "auroc": auroc, "probs": probs, "y": y.numpy()}


def _validation_threshold(val_probs, y_val, target_sensitivity) -> float:
    scores = positive_scores(val_probs)
    if scores.ndim == 2:  # multi-class: argmax decides, no threshold
        return float("nan")
    return choose_threshold(y_val, scores, target_sensitivity)


# ------------------------------------------------------------------------------------- data pieces
def class_weights(y, n_classes: int, imbalance: str) -> torch.Tensor:
    """'weighted_loss': N / (K * n_k) per class (inverse frequency, mean weight 1); otherwise all ones."""
    counts = np.bincount(np.asarray(y, int), minlength=n_classes).astype(float)
    if imbalance != "weighted_loss":
        return torch.ones(n_classes)
    return torch.as_tensor(counts.sum() / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)


def train_loader(dataset, y, cfg: FinetuneConfig, seed: int) -> DataLoader:
    """Shuffled loader, or a WeightedRandomSampler drawing each class equally often ('balanced_sampler')."""
    generator = torch.Generator().manual_seed(seed)
    # a last batch of one image breaks BatchNorm on 1x1 feature maps: drop it (it is re-drawn next epoch)
    drop_last = len(dataset) > cfg.batch_size and len(dataset) % cfg.batch_size == 1
    if cfg.imbalance == "balanced_sampler":
        counts = np.bincount(np.asarray(y, int))
        weights = 1.0 / counts[np.asarray(y, int)]
        sampler = WeightedRandomSampler(weights.tolist(), num_samples=len(y), replacement=True,
                                        generator=generator)
        return DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=drop_last)
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, generator=generator, drop_last=drop_last)


class FeatureSet(Dataset):
    """Precomputed (N, F) features with their labels, served in the same dict form as image datasets."""

    def __init__(self, feats: torch.Tensor, labels, image_ids=None):
        self.feats, self.labels, self.image_ids = feats, np.asarray(labels, int), image_ids

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.feats[i], "label": int(self.labels[i])}


@torch.no_grad()
def features(encoder: nn.Module, dataset: Dataset, batch_size: int) -> FeatureSet:
    encoder.eval()
    device = _device_of(encoder)
    feats, labels, ids = [], [], []
    for b in DataLoader(dataset, batch_size=batch_size):
        feats.append(encoder(b["image"].float().to(device)).cpu())
        labels.append(torch.as_tensor(b["label"]).long())
        ids.extend(b.get("image_id", []))
    return FeatureSet(torch.cat(feats), torch.cat(labels).numpy(), ids or None)  # (N, F)


def labels_of(dataset) -> np.ndarray:
    """Labels without decoding images when the dataset keeps them (FeatureSet, ImageDataset)."""
    labels = getattr(dataset, "labels", None)
    if labels is not None and not isinstance(labels, dict) and len(labels) == len(dataset):
        return np.asarray(list(labels), int)
    return np.asarray([int(dataset[i]["label"]) for i in range(len(dataset))], int)


def _device_of(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
