"""Two gloo processes run the real loop with a contrastive loss whose negatives are gathered across ranks
(medssl.ssl.losses.nt_xent): disjoint data per rank, synchronised weights, only rank 0 writes, resume works."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from medssl.config import TrainConfig
from medssl.ssl.losses import nt_xent  # the real cross-rank gather; imported here so forked ranks share it
from medssl.train.distributed import DistInfo, ResumableBatchSampler, init_distributed

WORLD = 2


class Cohort(torch.utils.data.Dataset):
    def __len__(self):
        return 24

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"image": torch.rand(1, 6, 6, generator=g), "index": i}


class TinyContrastive(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 8))
        self.unused = nn.LayerNorm(8).requires_grad_(False)  # never in the graph: frozen, as models/vit.py does
        self.seen: list[int] = []

    def forward(self, batch):
        self.seen += batch["index"].tolist()
        x = batch["image"]
        z1, z2 = self.encoder(x + 0.1 * torch.randn_like(x)), self.encoder(x + 0.1 * torch.randn_like(x))
        return {"loss": nt_xent(z1, z2, temperature=0.5)}


class FileTracker:
    def __init__(self, path: Path):
        self.path = path

    def log_metrics(self, metrics, step=None):
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


def _worker(rank: int, tmp: str, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from medssl.train import checkpoint as ckpt
    from medssl.train.distributed import cleanup, sharded_loader
    from medssl.train.loop import train
    tmp = Path(tmp)
    info = init_distributed()
    assert info == DistInfo(rank, WORLD, rank)
    save = ckpt.save_checkpoint

    def recording_save(path, **kw):  # who writes checkpoints
        with (tmp / f"saves{rank}.txt").open("a") as f:
            f.write(f"{path}\n")
        return save(path, **kw)
    ckpt.save_checkpoint = recording_save
    loader = sharded_loader(Cohort(), batch_size=3, seed=5)
    results = []
    for steps in (2, 3):  # the second call resumes from the first one's final checkpoint
        torch.manual_seed(123 + rank)  # different initial weights: DDP must broadcast rank 0's
        method = TinyContrastive()
        # accumulate=2: the first micro-batch runs under DDP's no_sync, the second all-reduces
        cfg = TrainConfig(steps=steps, batch_size=3, accumulate=2, lr=1e-2, warmup_steps=1, checkpoint_every=2,
                          log_every=2)
        results.append(train(method, loader, cfg, tmp / "out", FileTracker(tmp / f"log{rank}.jsonl"), "cpu"))
        (tmp / f"seen{rank}_{steps}.json").write_text(json.dumps(method.seen))
    torch.save(method.state_dict(), tmp / f"weights{rank}.pt")
    (tmp / f"results{rank}.json").write_text(json.dumps(results))
    cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_training(tmp_path):
    # fork: the ranks inherit the imported modules (MONAI behind medssl.ssl takes seconds to import)
    mp.start_processes(_worker, args=(str(tmp_path), _free_port()), nprocs=WORLD, join=True,
                       start_method="fork")
    first = [set(json.loads((tmp_path / f"seen{r}_2.json").read_text())) for r in range(WORLD)]
    assert first[0].isdisjoint(first[1]) and len(first[0]) == len(first[1]) == 2 * 2 * 3
    # 24 samples / (2 ranks x 3 x 2 micro-batches) = 2 steps an epoch: the first run covered it exactly once
    assert first[0] | first[1] == set(range(24))
    w0, w1 = (torch.load(tmp_path / f"weights{r}.pt") for r in range(WORLD))
    for name in w0:
        torch.testing.assert_close(w0[name], w1[name], rtol=0, atol=0)
    results = [json.loads((tmp_path / f"results{r}.json").read_text()) for r in range(WORLD)]
    assert all(r[1]["resumed_from"].endswith("step-00000002.pt") for r in results)
    assert results[0][1]["loss"] == pytest.approx(results[1][1]["loss"])  # the loss is averaged over ranks
    assert [Path(p).name for p in (tmp_path / "saves0.txt").read_text().split()] == [
        "step-00000002.pt", "step-00000003.pt"]
    assert not (tmp_path / "saves1.txt").exists() and not (tmp_path / "log1.jsonl").exists()
    assert [json.loads(line)["step"] for line in (tmp_path / "log0.jsonl").read_text().splitlines()] == [2, 3]


def test_sampler_shards_are_disjoint_and_cover_the_epoch():
    shards = [[i for b in ResumableBatchSampler(50, 4, seed=1, epoch=0, rank=r, world_size=3) for i in b]
              for r in range(3)]
    assert all(len(s) == 16 for s in shards)  # 50 // 12 = 4 global batches of 4 per rank
    assert len(set().union(*shards)) == 48


def _pretrain_worker(rank: int, tmp: str, port: int, encoder: str) -> None:
    """The real pretraining entry point under 2 gloo ranks, images held on the (CPU) device: a SimCLR ResNet,
    or a ViT MAE (DDP without the unused-parameter search fails at step 2 if any parameter went unused)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from medssl.config import EncoderConfig, MaskedConfig, PretrainConfig, SparKConfig, SSLConfig
    from medssl.train.distributed import cleanup
    from medssl.train.pretrain import run_pretraining
    from test_device_crops import NullTracker, t1_images
    cache = t1_images("3d")
    train = TrainConfig(steps=3, batch_size=2, warmup_steps=1, device_crops="on")
    if encoder == "vit":
        vit = EncoderConfig(name="vit", patch_size=4, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=16)
        masked = SSLConfig(masked=MaskedConfig(decoder_dim=8, decoder_depth=1, decoder_heads=2))
        cfg = PretrainConfig(encoder=vit, ssl=masked, crop=[12, 12], train=train)
    elif encoder == "spark":  # SparK: every decoder level and mask token in the graph, or DDP fails at step 2
        cfg = PretrainConfig(encoder=EncoderConfig(name="resnet10", width=0.25), ssl=SSLConfig(spark=SparKConfig()),
                             crop=[32, 32], train=train)
    else:
        cfg = PretrainConfig(encoder=EncoderConfig(name="resnet10"), crop=[12, 12], train=train)
    tracker = NullTracker()
    path = run_pretraining(cfg, cache, list(cache.arrays), None, Path(tmp), tracker, spatial_dims=2, device="cpu",
                           view_examples=0)
    (Path(tmp) / f"tags{rank}.json").write_text(json.dumps(tracker.tags))
    (Path(tmp) / f"encoder{rank}.txt").write_text(str(path))
    (Path(tmp) / f"steps{rank}.txt").write_text(str(torch.load(path)["steps"]))  # the file rank 0 wrote
    cleanup()


@pytest.mark.parametrize("encoder", ["resnet", "vit", "spark"])
def test_two_process_pretraining_with_images_on_the_device(tmp_path, encoder):
    mp.start_processes(_pretrain_worker, args=(str(tmp_path), _free_port(), encoder), nprocs=WORLD, join=True,
                       start_method="fork")
    assert (tmp_path / "encoder0.txt").read_text() == (tmp_path / "encoder1.txt").read_text()
    assert (tmp_path / "steps0.txt").read_text() == (tmp_path / "steps1.txt").read_text() == "3"
    assert json.loads((tmp_path / "tags0.json").read_text())["medssl.crops_cut_on"] == "cpu"
    assert json.loads((tmp_path / "tags1.json").read_text()) == {}  # only rank 0 talks to MLflow


def _sync_bn_worker(rank: int, tmp: str, port: int) -> None:
    """Each rank normalises its half of a batch with SparK's sparse BatchNorm on an nn.SyncBatchNorm."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from medssl.models.sparse import sparse_batch_norm
    from medssl.train.distributed import cleanup
    init_distributed()
    x, keep, weight = (t.chunk(WORLD)[rank] for t in _sync_bn_inputs())
    x.requires_grad_(True)
    bn = nn.SyncBatchNorm(4)
    y = sparse_batch_norm(bn, x, keep)
    (y * weight).sum().backward()
    torch.save({"y": y.detach(), "grad": x.grad, "mean": bn.running_mean, "var": bn.running_var},
               Path(tmp) / f"bn{rank}.pt")
    cleanup()


def _sync_bn_inputs():
    g = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(4, 4, 6, 6, generator=g) + 1   # (B, C, H, W)
    keep = (torch.rand(4, 1, 6, 6, generator=g) > 0.5).float()
    keep[:2] = keep[:2] * (torch.rand(2, 1, 6, 6, generator=g) > 0.5)  # rank 0 sees fewer visible positions
    return x, keep, torch.randn(4, 4, 6, 6, generator=g)


def test_sparse_sync_batch_norm_over_two_ranks_is_the_whole_batchs(tmp_path):
    """SparK's sparse BatchNorm under SyncBatchNorm (what the loop converts to on GPUs): two ranks with unequal
    visible counts give the statistics, outputs, input gradients and running averages of one process that
    holds the whole batch (the all-reduce is differentiable)."""
    from medssl.models.sparse import sparse_batch_norm
    mp.start_processes(_sync_bn_worker, args=(str(tmp_path), _free_port()), nprocs=WORLD, join=True,
                       start_method="fork")
    ranks = [torch.load(tmp_path / f"bn{r}.pt") for r in range(WORLD)]
    x, keep, weight = _sync_bn_inputs()
    x.requires_grad_(True)
    bn = nn.BatchNorm2d(4)
    y = sparse_batch_norm(bn, x, keep)
    (y * weight).sum().backward()
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks]), x.grad, rtol=1e-4, atol=1e-5)
    for r in ranks:
        torch.testing.assert_close(r["mean"], bn.running_mean)
        torch.testing.assert_close(r["var"], bn.running_var)
