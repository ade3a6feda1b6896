"""Online probe: high scores on class-separable embeddings, chance on random ones; wired into the loop."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medssl.config import TrainConfig
from medssl.train.distributed import sharded_loader
from medssl.train.loop import train
from medssl.train.probe import OnlineProbe, centre_crop, embed, knn_proba, score_embeddings

torch.set_num_threads(1)


def _clusters(n_per_class: int, n_classes: int, dim: int, spread: float, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * 3
    y = np.repeat(np.arange(n_classes), n_per_class)
    return centres[y] + spread * rng.normal(size=(len(y), dim)), y


@pytest.mark.parametrize("n_classes", [2, 3])
def test_separable_embeddings_score_high_random_ones_near_chance(n_classes):
    emb, y = _clusters(20, n_classes, 16, 0.5, seed=0)
    good = score_embeddings(emb, y, k=5, folds=5)
    assert set(good) == {"knn_bacc", "knn_auroc", "logreg_bacc", "logreg_auroc"}
    assert min(good.values()) > 0.95
    noise = np.random.default_rng(1).normal(size=emb.shape)
    bad = score_embeddings(noise, y, k=5, folds=5)
    assert abs(bad["knn_bacc"] - 1 / n_classes) < 0.25 and abs(bad["logreg_auroc"] - 0.5) < 0.25


def test_given_validation_subset_and_imbalance():
    emb, y = _clusters(30, 2, 8, 0.5, seed=2)
    keep = np.r_[0:30, 30:36]  # 30 negatives, 6 positives
    val_emb, val_y = _clusters(10, 2, 8, 0.5, seed=2)
    scores = score_embeddings(emb[keep], y[keep], k=3, val=(val_emb, val_y))
    assert scores["knn_bacc"] > 0.9 and scores["logreg_auroc"] > 0.95
    # a class with a single example: no cross-validation possible, nothing reported
    assert score_embeddings(emb[:31], y[:31]) == {}


def test_knn_uses_cosine_similarity():
    train_emb = np.array([[1.0, 0.0], [10.0, 0.5], [0.0, 1.0]])
    proba = knn_proba(train_emb, np.array([0, 0, 1]), np.array([[0.1, 5.0]]), k=1, n_classes=2)
    assert proba.tolist() == [[0.0, 1.0]]  # nearest by angle, not by distance


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Dropout(0.5))

    def forward(self, x):
        return self.net(x)


def test_embedding_is_frozen_deterministic_and_restores_train_mode():
    enc = Encoder().train()
    images = torch.rand(10, 1, 4, 4)
    before = [b.clone() for b in enc.buffers()]
    a, b = embed(enc, images, torch.device("cpu"), 3), embed(enc, images, torch.device("cpu"), 4)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert enc.training and all(torch.equal(x, y) for x, y in zip(before, enc.buffers()))


class Labelled(torch.utils.data.Dataset):
    """Bright vs dark 4x4 images: separable by mean intensity."""

    def __len__(self):
        return 24

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"image": torch.rand(1, 4, 4, generator=g) + 2.0 * (i % 2), "label": i % 2, "index": i}


class Method(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = Encoder()

    def forward(self, batch):
        return {"loss": self.encoder(batch["image"]).pow(2).mean()}


def test_probe_runs_inside_training_and_is_logged(tmp_path):
    logged = []

    class Tracker:
        def log_metrics(self, metrics, step=None):
            logged.append((step, metrics))

    probe = OnlineProbe.from_dataset(Labelled(), k=3, folds=3)
    cfg = TrainConfig(steps=4, batch_size=4, probe_every=2, log_every=4, warmup_steps=0)
    train(Method(), sharded_loader(Labelled(), 4, seed=0), cfg, tmp_path, Tracker(), "cpu", probe=probe)
    probes = [(s, m) for s, m in logged if any(k.startswith("probe/") for k in m)]
    assert [s for s, _ in probes] == [2, 4]
    assert probes[-1][1]["probe/logreg_bacc"] > 0.9


@pytest.mark.parametrize("shape", [(1, 7, 4), (1, 9, 3, 6)])
def test_centre_crop_crops_and_pads(shape):
    image = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(shape)
    size = [5, 5] if len(shape) == 3 else [5, 5, 4]
    out = centre_crop(image, size)
    assert out.shape == (1, *size)
    if len(shape) == 3:  # rows 1..5 of 7 kept; 4 columns padded to 5 (0 before, 1 after)
        assert torch.equal(out[0, :, :4], image[0, 1:6, :]) and out[0, :, 4].abs().sum() == 0


def test_make_probe_from_a_cache_samples_stratified_and_centre_crops():
    from medssl.train.probe import make_probe

    class Cache:  # the VolumeCache interface over arrays of different sizes
        def get(self, image_id):
            i = int(image_id[-2:])
            return np.full((1, 10 + i % 3, 12), float(i % 2), dtype=np.float16)  # (C, X, Y)

    ids = [f"img-0000000000{i:02d}" for i in range(40)]
    labels = [int(i % 4 == 0) for i in range(40)]  # 10 positives
    probe = make_probe(Cache(), ids, labels, crop=[8, 8], spatial_dims=2, k=3, max_images=20)
    assert probe.images.shape == (20, 1, 8, 8) and 4 <= probe.labels.sum() <= 6
    assert make_probe(Cache(), ids[:3], [0, 0, 1], crop=[8, 8], spatial_dims=2) is None
