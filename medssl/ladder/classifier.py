"""Encoder + linear head, trained under one of two protocols, with checks before any training starts.

Protocols
- "linear": the encoder is frozen; its features are computed ONCE and a converged, standardised scikit-learn
  logistic regression is fitted on them (inner.fit_probe: C chosen inside the rung), then folded into the torch
  head (models/probe.py), so the head lives in the same Classifier that is saved, logged to MLflow and scored by
  `predict`, with one code path for binary and multi-class.
- "finetune": encoder and head train together (AdamW, one warm-up epoch then cosine decay); the encoder's
  learning rate is lr * encoder_lr_scale so the pretrained features are adjusted, not overwritten; optional
  random views of the training images (finetune.views), drawn from the run's seed; under inner validation the
  result is the Ensemble of the fold models (inner.py says why).
Every choice (epochs, C, the binary operating point stored in the model's `threshold` buffer) is made on the
held-out parts of `inner.Folds`: inner cross-validation over the rung's own patients, or the legacy validation
split; see inner.py. The test split is never looked at here.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, WeightedRandomSampler

from medssl.config import FinetuneConfig
from medssl.errors import ConfigError, DataError, TrainingError
from medssl.ladder.inner import Folds, fit_probe, held_out_scores, split_folds, threshold_of
from medssl.models.classifier import Classifier
from medssl.models.ensemble import Ensemble
from medssl.models.probe import load_folded

PROTOCOLS = ("linear", "finetune")


@dataclass
class FitResult:
    model: Classifier | Ensemble     # finetune with inner validation: the K fold models (ladder/inner.py)
    threshold: float
    val_loss: float
    val_auroc: float
    epochs: int                 # finetune: the chosen epochs (best mean held-out epoch); linear: strengths tried
    history: list[dict] = field(default_factory=list)
    chosen_C: float = float("nan")


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
    """Every class must be in the rung's training subset, in the validation split when one is used (thresholds,
    early stopping) and in test (AUROC). `splits`: {"training subset": labels, "test split": labels, ...}."""
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
def fit_rung(encoder: nn.Module, dataset: Dataset, folds: Folds, n_classes: int, protocol: str,
             cfg: FinetuneConfig, seed: int, monitor: str = "val_loss", device: str | None = None,
             spatial_dims: int | None = None) -> FitResult:
    """Train a Classifier on `dataset` (the rung's images, then for validation: split the validation images),
    every choice made on the held-out parts of `folds` (datasets yield dicts; linear: a FeatureSet)."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}", where="finetune.protocols", fix=f"one of {PROTOCOLS}")
    if monitor not in ("val_loss", "val_auroc"):
        raise ConfigError(f"unknown early-stopping monitor {monitor!r}", fix="val_loss or val_auroc")
    torch.manual_seed(seed)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    y = labels_of(dataset)
    if protocol == "linear":
        model = Classifier(encoder, n_classes, spatial_dims=spatial_dims)
        for p in model.encoder.parameters():
            p.requires_grad_(False)
        feats = dataset if isinstance(dataset, FeatureSet) else features(encoder.to(device), dataset, cfg.batch_size)
        probe = fit_probe(feats.feats.numpy(), y, folds, n_classes, cfg.imbalance != "none", monitor, seed,
                          class_weights(y[folds.refit if folds.refit is not None else folds.splits[0][0]],
                                        n_classes, cfg.imbalance).numpy(), cfg.target_sensitivity)
        load_folded(model.head, probe.model, n_classes)
        result = FitResult(model, probe.threshold, probe.val_loss, probe.val_auroc, len(probe.history),
                           probe.history, chosen_C=probe.C)
    else:
        result = _fit_finetune(encoder, dataset, y, folds, n_classes, cfg, seed, monitor, device, spatial_dims)
    result.model.threshold.fill_(result.threshold)
    result.model = result.model.cpu().eval()
    return result


def fit(encoder: nn.Module, train_ds: Dataset, val_ds: Dataset, n_classes: int, protocol: str,
        cfg: FinetuneConfig, seed: int, monitor: str = "val_loss", device: str | None = None,
        spatial_dims: int | None = None) -> FitResult:
    """Legacy form (validation: split): train on `train_ds`, every choice made on `val_ds`."""
    if isinstance(train_ds, FeatureSet) and isinstance(val_ds, FeatureSet):
        both = FeatureSet(torch.cat([train_ds.feats, val_ds.feats]), np.r_[train_ds.labels, val_ds.labels])
    else:
        both = ConcatDataset([train_ds, val_ds])
        both.labels = np.r_[labels_of(train_ds), labels_of(val_ds)]
    return fit_rung(encoder, both, split_folds(len(train_ds), len(val_ds)), n_classes, protocol, cfg, seed,
                    monitor, device, spatial_dims)


def _fit_finetune(encoder, dataset, y, folds: Folds, n_classes, cfg, seed, monitor, device, spatial_dims):
    """The folds train in lockstep from the same initial weights, early-stopped on their MEAN held-out score.
    Inner validation keeps the K fold models at the best mean epoch as an Ensemble (mean probability): those
    same models made the out-of-fold predictions that chose the epoch and the threshold, so the threshold is
    applied on the scale it was chosen on (a refit on the whole rung trains for other steps and lands on
    another score scale). validation: split keeps its one fold's model at its best epoch."""
    single = folds.refit is None
    runs = [_Fold(Classifier(encoder if single else copy.deepcopy(encoder), n_classes, spatial_dims=spatial_dims)
                  .to(device), dataset, y, tr, va, cfg, seed, device) for tr, va in folds.splits]
    best, waited, history = None, 0, []
    for epoch in range(1, cfg.epochs + 1):
        vals = [run.next_epoch() for run in runs]
        history.append({"epoch": epoch, "val_loss": float(np.mean([v["loss"] for v in vals])),
                        "val_auroc": float(np.mean([v["auroc"] for v in vals]))})
        score = -history[-1]["val_loss"] if monitor == "val_loss" else history[-1]["val_auroc"]
        if best is None or score > best["score"]:
            best, waited = {"score": score, "epoch": epoch, "probs": [v["probs"] for v in vals],
                            "states": [run.snapshot() for run in runs]}, 0
        else:
            waited += 1
            if waited >= cfg.patience:
                break
    oof = np.zeros((len(y), n_classes))
    for (_, va), probs in zip(folds.splits, best["probs"]):
        oof[va] = probs   # (n_held_out, K): each rung patient predicted by the one member that did not train on it
    for run, state in zip(runs, best["states"]):
        run.model.load_state_dict(state)
    held = folds.held_out
    loss, auroc = held_out_scores(y[held], oof[held], np.ones(n_classes))
    model = runs[0].model if single else Ensemble([run.model for run in runs])
    threshold = threshold_of(y[held], oof[held], cfg.target_sensitivity)
    return FitResult(model, threshold, loss, auroc, best["epoch"], history)


class _Fold:
    """One fold's training (optimizer, schedule, shuffled loader, class-weighted loss), advanced one epoch at a
    time by _fit_finetune and scored on its held-out part after each (K folds are on the device at once)."""

    def __init__(self, model, dataset, y, train_idx, held_idx, cfg: FinetuneConfig, seed: int, device):
        self.model, self.cfg, self.device = model, cfg, device
        self.held_out = Subset(dataset, held_idx)
        optimizer, scheduler, loader, self.loss_fn = _training(model, Subset(dataset, train_idx), y[train_idx], cfg,
                                                               seed, device)
        self.epochs = train_epochs(model, loader, optimizer, scheduler, self.loss_fn, cfg, device, seed, cfg.epochs)

    def next_epoch(self) -> dict:
        next(self.epochs)
        return evaluate_loss(self.model, self.held_out, self.loss_fn, self.cfg.batch_size, self.device)

    def snapshot(self) -> dict:
        """The weights now, copied to the CPU (K of them are kept: the best mean epoch's)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}


def _training(model, train_ds, y_train, cfg: FinetuneConfig, seed: int, device):
    """Optimizer (encoder lr scaled), per-step schedule, shuffled loader and class-weighted loss of one fit."""
    groups = [{"params": model.encoder.parameters(), "lr": cfg.lr * cfg.encoder_lr_scale},
              {"params": model.head.parameters(), "lr": cfg.lr}]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    loader = train_loader(train_ds, y_train, cfg, seed)
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(y_train, model.head.out_features, cfg.imbalance).to(device))
    return optimizer, _schedule(optimizer, cfg, len(loader)), loader, loss_fn


def _schedule(optimizer, cfg: FinetuneConfig, steps_per_epoch: int):
    """Per-step lr factor: one epoch of linear warm-up, then cosine decay to 0 at `epochs` (or constant).
    With a handful of labelled images a constant lr keeps jumping around the minimum to the last epoch."""
    from medssl.train.schedule import warmup_cosine
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return warmup_cosine(optimizer, min(steps_per_epoch, total), total)


def train_epochs(module, loader, optimizer, scheduler, loss_fn, cfg, device, seed: int, epochs: int):
    """Yield after each of `epochs` training epochs (the caller validates, or not, between them)."""
    from medssl.augment.views import make_views
    views = torch.Generator(device=device).manual_seed(seed)  # the views are part of the seed, like the order
    for epoch in range(1, epochs + 1):
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
        yield epoch


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
