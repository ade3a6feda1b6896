"""Online "is it learning?" probe: embed a small labelled subset with the frozen encoder, score it.

Every `train.probe_every` steps the loop calls `probe(encoder, device)`; the scores are logged next to the loss:
kNN on cosine similarity and logistic regression (models/probe.py, the one the ladder's linear protocol also
uses), each as balanced accuracy and AUROC. Without a separate validation subset, scores are out-of-fold
predictions from stratified cross-validation on the labelled subset.
The probe reads no global random state (folds use their own seed) so it never changes the training run.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold
from torch import nn

from medssl.models.probe import logistic_proba
from medssl.ui import console


def knn_proba(train_emb: np.ndarray, train_y: np.ndarray, query: np.ndarray, k: int,
              n_classes: int) -> np.ndarray:
    """(n_query, n_classes) class shares among the k most cosine-similar training embeddings, similarity-weighted."""
    a = train_emb / np.linalg.norm(train_emb, axis=1, keepdims=True).clip(1e-12)
    b = query / np.linalg.norm(query, axis=1, keepdims=True).clip(1e-12)
    sim = b @ a.T  # (n_query, n_train)
    k = min(k, len(train_y))
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]  # (n_query, k)
    weights = np.take_along_axis(sim, top, axis=1) + 1.0  # cosine in [-1, 1] -> non-negative vote
    votes = np.zeros((len(query), n_classes))
    np.add.at(votes, (np.repeat(np.arange(len(query)), k), train_y[top].ravel()), weights.ravel())
    return votes / votes.sum(axis=1, keepdims=True).clip(1e-12)


def classification_scores(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """Balanced accuracy and AUROC (one-vs-rest macro for more than two classes); NaN if undefined."""
    scores = {"bacc": float(balanced_accuracy_score(y, proba.argmax(axis=1)))}
    try:
        if proba.shape[1] == 2:
            scores["auroc"] = float(roc_auc_score(y, proba[:, 1]))
        else:
            present = np.unique(y)
            p = proba[:, present] / proba[:, present].sum(axis=1, keepdims=True).clip(1e-12)
            scores["auroc"] = float(roc_auc_score(y, p, multi_class="ovr", labels=present))
    except ValueError:  # one class only in y
        scores["auroc"] = math.nan
    return scores


def score_embeddings(emb: np.ndarray, y: np.ndarray, k: int = 20, folds: int = 5,
                     val: tuple[np.ndarray, np.ndarray] | None = None, seed: int = 0) -> dict[str, float]:
    """{"knn_bacc", "knn_auroc", "logreg_bacc", "logreg_auroc"}: fit on (emb, y), score on `val` if given,
    else out-of-fold over stratified folds (as many as the rarest class allows, at most `folds`)."""
    y = np.asarray(y, dtype=int)
    n_classes = int(max(y.max(), val[1].max() if val is not None else 0)) + 1
    if val is not None:
        fits = [(np.arange(len(y)), None)]
        truth, queries = np.asarray(val[1], dtype=int), [val[0]]
    else:
        n_splits = min(folds, int(np.bincount(y)[np.unique(y)].min()))
        if len(np.unique(y)) < 2 or n_splits < 2:
            return {}
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        fits = list(splitter.split(emb, y))
        truth, queries = y[np.concatenate([test for _, test in fits])], [emb[test] for _, test in fits]
    knn, logreg = [], []
    for (train_idx, _), query in zip(fits, queries):
        knn.append(knn_proba(emb[train_idx], y[train_idx], query, k, n_classes))
        logreg.append(_pad(logistic_proba(emb[train_idx], y[train_idx], query, seed), n_classes))
    out = {f"knn_{m}": v for m, v in classification_scores(truth, np.concatenate(knn)).items()}
    out.update({f"logreg_{m}": v for m, v in classification_scores(truth, np.concatenate(logreg)).items()})
    return out


def _pad(proba: np.ndarray, n_classes: int) -> np.ndarray:
    return np.pad(proba, ((0, 0), (0, n_classes - proba.shape[1])))


@torch.no_grad()
def embed(encoder: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 32) -> np.ndarray:
    """(N, out_features) float embeddings; eval mode (BatchNorm uses running stats, dropout off), restored after."""
    was_training = encoder.training
    encoder.eval()
    try:
        chunks = [encoder(images[i: i + batch_size].to(device)).float().flatten(1).cpu()
                  for i in range(0, len(images), batch_size)]
    finally:
        encoder.train(was_training)
    return torch.cat(chunks).numpy()


def centre_crop(image: torch.Tensor, size: list[int]) -> torch.Tensor:
    """(C, *spatial) -> (C, *size): the centre, zero-padded where the image is smaller."""
    for axis, want in enumerate(size, start=1):
        have = image.shape[axis]
        if have > want:
            image = image.narrow(axis, (have - want) // 2, want)
        elif have < want:
            pad = [0, 0] * (image.ndim - 1 - axis) + [(want - have) // 2, want - have - (want - have) // 2]
            image = torch.nn.functional.pad(image, pad)
    return image


class OnlineProbe:
    """`probe(encoder, device) -> scores`, over a labelled subset given as (images (N, C, *size), labels (N,)),
    optionally with a separate validation subset. Images are kept on the CPU, batches go to the device."""

    def __init__(self, images: torch.Tensor, labels, k: int = 20, folds: int = 5,
                 val: tuple[torch.Tensor, object] | None = None, batch_size: int = 32, seed: int = 0):
        self.images, self.labels = images, np.asarray(labels, dtype=int)
        self.val = (val[0], np.asarray(val[1], dtype=int)) if val is not None else None
        self.k, self.folds, self.batch_size, self.seed = k, folds, batch_size, seed

    @classmethod
    def from_dataset(cls, dataset, crop: list[int] | None = None, **kwargs) -> "OnlineProbe":
        """From a map-style dataset of {"image", "label"} (e.g. medssl.data.loaders.ImageDataset). `crop`:
        centre-crop / zero-pad every image to the pretraining crop (a ViT accepts only the size it was built for)."""
        items = [dataset[i] for i in range(len(dataset))]
        images = [torch.as_tensor(it["image"]).float() for it in items]
        if crop is not None:
            images = [centre_crop(image, crop) for image in images]
        return cls(torch.stack(images), [int(it["label"]) for it in items], **kwargs)

    def __call__(self, encoder: nn.Module, device: torch.device) -> dict[str, float]:
        emb = embed(encoder, self.images, device, self.batch_size)
        val = None
        if self.val is not None:
            val = (embed(encoder, self.val[0], device, self.batch_size), self.val[1])
        scores = score_embeddings(emb, self.labels, self.k, self.folds, val, self.seed)
        if not scores:
            console.print("[yellow]probe skipped:[/] the labelled subset needs two classes with 2+ images each")
        return {name: value for name, value in scores.items() if not math.isnan(value)}


def make_probe(cache, image_ids, labels, crop: list[int], spatial_dims: int, k: int = 20, folds: int = 5,
               max_images: int = 256, seed: int = 0) -> OnlineProbe | None:
    """An OnlineProbe over at most `max_images` labelled cached images (a class-stratified sample), centre-cropped
    to the pretraining crop; None (no probe) when fewer than two classes have two images each.
    Use labelled images of the training split only: val/test stay unseen until evaluation."""
    from medssl.train.loaders import ImageDataset
    ids, y = _stratified_sample(list(image_ids), np.asarray(labels, dtype=int), max_images, seed)
    counts = np.bincount(y) if len(y) else np.array([])
    if (counts >= 2).sum() < 2:
        console.print("[yellow]no online probe:[/] it needs two classes with 2+ labelled images each")
        return None
    dataset = ImageDataset(cache, ids, [int(v) for v in y], spatial_dims=spatial_dims)
    return OnlineProbe.from_dataset(dataset, crop=crop, k=k, folds=folds, seed=seed)


def _stratified_sample(ids: list, y: np.ndarray, limit: int, seed: int) -> tuple[list, np.ndarray]:
    """Up to `limit` items keeping class shares (each present class keeps at least 2, where it has them)."""
    if len(ids) <= limit:
        return ids, y
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        n = max(min(2, len(members)), round(limit * len(members) / len(y)))
        keep.extend(rng.choice(members, size=min(n, len(members)), replace=False).tolist())
    keep = sorted(keep)
    return [ids[i] for i in keep], y[keep]
